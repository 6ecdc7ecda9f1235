"""`python -m agent`: the CLI, or, as PID 1 with no arguments (the image's /init runs this
module through cidboot.stage.pid1.run_stage), the device agent (agent.device.main)."""

import os
import sys

from agent.device import is_device_boot

if __name__ == "__main__":
    if is_device_boot(os.getpid(), sys.argv):
        from agent.device import main as device_main

        device_main()
    else:
        from agent.cli import main

        sys.exit(main())
