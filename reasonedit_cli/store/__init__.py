"""The on-disk codebook: records, files, the reader, the writer and the derived index.

Work in progress (issue 20, item 1): the modules of ``reasonedit_cli.codebook`` and
``reasonedit_cli.derived`` move here, one concern per file.
"""
