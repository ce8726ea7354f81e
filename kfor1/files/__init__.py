"""What kfor1 writes to disk for others to read: patch files, base files, and how they are written.

Station 5 of the data's order (config -> data -> model -> patch -> multi-task state and step ->
**files** -> serving). Every file here is read as hostile input: bounded, hashed, schema-checked,
never executed, and never naming a path outside its folder.

- ``kfor1.files.patchfile``: one task as a small directory on a fingerprinted base
  (``export_patch``, ``load_patch``, ``apply_patch``, ``load_patched``);
- ``kfor1.files.patchcheck``: the schema and limits every patch file is checked against;
- ``kfor1.files.basefile``: a jointly trained run's shared network (``export_base``,
  ``load_base_dir``), which its patches point to;
- ``kfor1.files.atomic``: atomic writes and free-space checks, so no file is ever half written.

May import: ``kfor1.multitask``, ``kfor1.patch``, ``kfor1.models`` and the shared root modules.
Never serving or the trainer.
"""
