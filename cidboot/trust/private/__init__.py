"""Private images: what storage providers must not read (docs/privacy.md).

- `stream`: the layer encryption construction (age's STREAM: ChaCha20-Poly1305 in 64 KiB chunks,
  nonce = 11-byte big-endian chunk counter || last-chunk flag), streaming, every failure typed.
- `keys`: the per-flow secret and the layer key derivation (HKDF-SHA256 over the secret, salted
  with the layer's plaintext SHA-256): same flow + secret = same ciphertext = same CIDs.
- `carried`: what an encrypted image carries inside itself (its plain flow block) while the
  manifest's flow and operation CIDs name ciphertext; how the agent finds it.
- `broker`: the key broker's core: appraise fresh evidence whose nonce binds an ephemeral X25519
  key, check the policy (data, per manifest), release the layer keys wrapped to that key.

Guest code may import this package (the bootstrap decrypts): stdlib, `cryptography` and
cidboot only.
"""
