"""Files that hold our work: Patchscope folders and the catalogue, sweep folders (manifest, shards, records), lenses.

``from pyvene_patchscopes.persist import write_folder`` keeps working: the old module's public names are
re-exported here.
"""

from .folders import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Folder,
    catalogue,
    catalogue_root,
    check_models,
    describe,
    download,
    load_patchscope,
    locate,
    looks_like_path,
    model_record,
    patchscope_from_hub,
    push_to_hub,
    read_folder,
    save_patchscope,
    write_folder,
)

__all__ = [
    "save_patchscope",
    "load_patchscope",
    "patchscope_from_hub",
    "write_folder",
    "read_folder",
    "Folder",
    "locate",
    "looks_like_path",
    "catalogue",
    "catalogue_root",
    "describe",
    "model_record",
    "check_models",
    "push_to_hub",
    "download",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
]
