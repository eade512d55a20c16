import sys

from memckpt.agent.daemon import main

sys.exit(main())
