"""`python -m agent`: the CLI, or, as PID 1 with no arguments (the image's /init runs this
module through cidboot.pid1.run_stage), the device agent (agent.device.main)."""

import os
import sys

if os.getpid() == 1 and len(sys.argv) <= 1:
    from agent.device import main as device_main

    device_main()
else:
    from agent.cli import main

    sys.exit(main())
