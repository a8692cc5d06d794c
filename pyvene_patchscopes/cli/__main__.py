"""`python -m pyvene_patchscopes.cli` (and `accelerate launch -m pyvene_patchscopes.cli`): the `patchscopes` command."""

import sys

from .entry import main

if __name__ == "__main__":  # importing the module (pkgutil.walk_packages, docs tools) runs nothing
    sys.exit(main())
