"""bootstrap: the L1 stage and the boot server. As PID 1 with no arguments (the image's /init runs
this module through cidboot.stage.pid1.run_stage) it boots (bootstrap.stage.main); otherwise it is the
`bootstrap` CLI. The CLI is imported only off PID 1: it pulls in the boot server's dependencies
(scapy, tftpy), which the bootstrap image does not carry."""
import os
import sys

if os.getpid() == 1 and len(sys.argv) <= 1:
    from bootstrap.stage.main import main as stage_main

    stage_main()
else:
    from bootstrap.cli import main

    sys.exit(main())
