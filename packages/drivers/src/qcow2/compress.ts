/**
 * Decompression of qcow2 compressed clusters (qcow2.md §7): compression type 0 is raw deflate with a
 * 4 KiB window (window bits -12, no zlib header), type 1 is a zstd frame stream. A cluster decodes to
 * exactly `clusterSize` bytes; input after that (the rest of the last 512-byte sector, possibly the start
 * of the next compressed cluster) is ignored. Output is bounded by `clusterSize`.
 */
import { constants, inflateRawSync } from "node:zlib";
import { BlkError } from "@blk/core";
import { Decompress } from "fzstd";

const corrupt = (cause?: unknown): BlkError =>
  new BlkError("EIO", "Could not decompress a compressed cluster", cause === undefined ? {} : { cause });

/** Inflates raw deflate data into `out` (its whole length). @throws {BlkError} EIO */
export function inflateCluster(src: Uint8Array, out: Uint8Array): void {
  let got: Buffer;
  try {
    got = inflateRawSync(src, {
      windowBits: 12,
      // QEMU accepts a stream cut short as long as the cluster is complete.
      finishFlush: constants.Z_SYNC_FLUSH,
      maxOutputLength: out.length,
    });
  } catch (e) {
    throw corrupt(e);
  }
  if (got.length < out.length) throw corrupt();
  out.set(got.subarray(0, out.length));
}

/** Decodes zstd frames into `out` until it is full. @throws {BlkError} EIO */
export function zstdCluster(src: Uint8Array, out: Uint8Array): void {
  let pos = 0;
  let failed: unknown;
  const d = new Decompress((chunk: Uint8Array) => {
    if (pos >= out.length) return;
    const n = Math.min(chunk.length, out.length - pos);
    out.set(chunk.subarray(0, n), pos);
    pos += n;
  });
  // Feed in small pieces and stop as soon as the cluster is complete, so trailing bytes (the next
  // compressed cluster, or padding) are never parsed and output stays bounded.
  const step = 4096;
  try {
    for (let i = 0; i < src.length && pos < out.length; i += step) {
      d.push(src.subarray(i, Math.min(src.length, i + step)), false);
    }
  } catch (e) {
    failed = e;
  }
  if (pos < out.length) throw corrupt(failed);
}
