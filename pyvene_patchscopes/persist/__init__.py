"""Files that hold our work: Patchscope folders and the catalogue, sweep folders (manifest, shards, records), lenses.

``from pyvene_patchscopes.persist import write_folder`` keeps working: the old module's public names are
re-exported here.
"""
from .folders import (CONFIG_FILE, WEIGHTS_FILE, Folder, catalogue, catalogue_root, check_models, describe, download,
                      locate, looks_like_path, model_record, push_to_hub, read_folder, write_folder)

__all__ = ["write_folder", "read_folder", "Folder", "locate", "looks_like_path", "catalogue", "catalogue_root",
           "describe", "model_record", "check_models", "push_to_hub", "download", "CONFIG_FILE", "WEIGHTS_FILE"]
