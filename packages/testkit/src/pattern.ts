import { createHash } from "node:crypto";

/**
 * Deterministic data: byte `i` of the disk is a function of `(seed, i)` alone, so any range can be
 * regenerated and checked without keeping a copy. Every 8-byte word differs from its neighbours and no
 * 512-byte sector is all zero, so a misplaced or zeroed sector is always detected.
 */
export function pattern(seed: number, offset: number, length: number): Uint8Array {
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i++) out[i] = patternByte(seed, offset + i);
  return out;
}

/** Byte `pos` of the pattern for `seed` (a cheap integer hash of the 8-byte word index, then the byte lane). */
export function patternByte(seed: number, pos: number): number {
  const word = Math.floor(pos / 8);
  let h = (Math.imul(word ^ (word / 0x100000000), 0x9e3779b1) ^ Math.imul(seed | 0, 0x85ebca6b)) >>> 0;
  h ^= h >>> 15;
  h = Math.imul(h, 0x2c1b3c6d) >>> 0;
  h ^= h >>> 12;
  const lane = pos % 8;
  const b = (h >>> ((lane & 3) * 8)) & 0xff;
  return lane < 4 ? b : b ^ 0xa5 ^ lane;
}

/** Fills `len` bytes with one value: the qemu-io `write -P` pattern. */
export function fill(value: number, length: number): Uint8Array {
  return new Uint8Array(length).fill(value);
}

/** SHA-256 of the bytes, lowercase hex. */
export function sha256(data: Uint8Array | readonly Uint8Array[]): string {
  const h = createHash("sha256");
  if (data instanceof Uint8Array) h.update(data);
  else for (const d of data) h.update(d);
  return h.digest("hex");
}

/** Index of the first byte where `a` and `b` differ, or -1 when equal (lengths must match). */
export function firstDifference(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

/**
 * A deterministic pseudo-random generator (xorshift32) for reproducible random workloads: each call
 * returns a number in [0, 1). The same seed gives the same sequence on every machine.
 */
export function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s / 2 ** 32;
  };
}
