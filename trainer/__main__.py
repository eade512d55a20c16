from memckpt.trainer.train import exit_now, main

exit_now(main())
