from hf_demo.cli import main

raise SystemExit(main())
