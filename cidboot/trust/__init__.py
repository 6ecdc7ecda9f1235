"""Who is trusted and why: COSE and keys, Open Profile for DICE, the signed manifest, EAT
evidence, appraisal, the device registry, and the measurement rules every stage follows.

Built on `cidboot.ipld` (DAG-CBOR, CIDs); never imports `store`, `netboot` or `stage`, so the
trust decisions can be read and tested on their own.
"""
