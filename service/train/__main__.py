from service.train.entry import exit_process, main

exit_process(main)
