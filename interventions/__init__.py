"""The shipped Patchscope catalogue (installed as ``pyvene_patchscopes.catalogue``); one folder per spec."""
