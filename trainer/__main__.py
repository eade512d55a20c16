import sys

from memckpt.trainer.train import main

sys.exit(main())
