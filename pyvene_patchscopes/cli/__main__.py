"""`python -m pyvene_patchscopes.cli` (and `accelerate launch -m pyvene_patchscopes.cli`): the `patchscopes` command."""
import sys

from .entry import main

sys.exit(main())
