"""Content addressing: CIDs and multiformats, strict DAG-CBOR, dag-pb and UnixFS, CAR files.

Pure formats: bytes in, typed values out, every decoder strict (one canonical encoding, precise
FormatError). Imports nothing from cidboot but `cidboot.errors`; runs in every guest stage.
"""
