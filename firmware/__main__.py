"""firmware: the L0 stage. As PID 1 with no arguments (the image's /init runs this module through
cidboot.stage.pid1.run_stage) it boots (firmware.stage.main); otherwise it is the `firmware` CLI."""
import os
import sys

if os.getpid() == 1 and len(sys.argv) <= 1:
    from firmware.stage import main as stage_main

    stage_main()
else:
    from firmware.cli import main

    sys.exit(main())
