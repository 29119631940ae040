from service.node.exits import exit_process
from service.train.entry import main

exit_process(main)
