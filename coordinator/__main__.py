import sys

from memckpt.coordinator.daemon import main

sys.exit(main())
