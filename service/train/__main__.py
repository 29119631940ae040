import sys

from service.train.entry import main

sys.exit(main())
