"""The old spelling of ``python -m service.node.shim`` (standard library only, as the shim)."""

from service.node.shim import main

if __name__ == "__main__":
    main()
