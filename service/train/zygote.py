"""The old spelling of ``python -m service.node.zygote``."""

import sys

from service.node.zygote import main

if __name__ == "__main__":
    sys.exit(main())
