"""The old spelling of ``python -m service.node.agent`` (manifests written before the node
package still run it)."""

import sys

from service.node.agent import main

if __name__ == "__main__":
    sys.exit(main())
