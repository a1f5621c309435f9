/**
 * `qemu-img create -f qcow2`: lays out an empty image the way QEMU 7.2 does (qcow2.md §16) — header in
 * cluster 0 (v3 with header_length 112 by default, v2 for compat 0.10), extensions (backing format,
 * feature name table when v3 and cluster_size > 4096), the backing file name after the end marker,
 * reftable in cluster 1, first refcount block in cluster 2, L1 table from cluster 3 sized for the virtual
 * size (written with exactly `l1_size * 8` bytes, so the file is not padded to a whole cluster).
 */
import { BlkError, BlockGraph, backendParent, PERM } from "@blk/core";
import { fileDriver } from "../file/index.ts";
import { COMPAT_LAZY_REFCOUNTS, featureNameTable, QCOW2_EXT, QCOW2_MAGIC } from "./format.ts";

/** Options of {@link createQcow2} (QEMU's `BlockdevCreateOptionsQcow2`, camel-cased). */
export interface CreateQcow2Options {
  filename: string;
  /** Virtual size in bytes (rounded up to a multiple of 512, as qemu-img). */
  size: number;
  /** Cluster size: a power of two from 512 to 2 MiB (default 65536). */
  clusterSize?: number;
  /** `0.10` writes a version 2 header; `1.1` (default) a version 3 one. */
  compat?: "0.10" | "1.1";
  /** Compatible bit 0 (v3 only). */
  lazyRefcounts?: boolean;
  /** Refcount width: a power of two from 1 to 64 (default 16; v2 only 16). */
  refcountBits?: number;
  /** Backing file name stored as given (not resolved). */
  backingFile?: string;
  /** Backing format stored in the backing-format extension. */
  backingFormat?: string;
}

/**
 * `qemu-img create -o` / `blockdev-create` options as the CLI passes them: QAPI names with dashes
 * (`cluster-size`, `refcount-bits`, `lazy-refcounts`, `backing-file`, `backing-fmt`, `compat`), values as
 * text (`64k`, `on`) or as numbers and booleans.
 */
export interface Qcow2CreateQapi {
  filename: string;
  size: number | string;
  [option: string]: unknown;
}

const SUFFIX: Record<string, number> = {
  b: 1,
  k: 2 ** 10,
  m: 2 ** 20,
  g: 2 ** 30,
  t: 2 ** 40,
  p: 2 ** 50,
  e: 2 ** 60,
};

function sizeOption(key: string, v: unknown): number {
  if (typeof v === "number") return v;
  const m = typeof v === "string" ? /^(\d+(?:\.\d+)?)\s*([bkmgtpe]?)$/i.exec(v.trim()) : null;
  if (m === null) {
    throw new BlkError("EINVAL", `Parameter '${key}' expects a non-negative number below 2^64`);
  }
  return Math.round(Number(m[1]) * (SUFFIX[(m[2] ?? "").toLowerCase()] ?? 1));
}

function boolOption(key: string, v: unknown): boolean {
  if (typeof v === "boolean") return v;
  if (v === "on" || v === "true" || v === "yes") return true;
  if (v === "off" || v === "false" || v === "no") return false;
  throw new BlkError("EINVAL", `Parameter '${key}' expects 'on' or 'off'`);
}

/** Options with a value blk cannot honour yet, and the only value accepted. */
const ONLY: Record<string, unknown> = {
  preallocation: "off",
  "extended-l2": false,
  "compression-type": "zlib",
  encrypt: false,
};

/**
 * Reads {@link CreateQcow2Options} from camel-cased options or from QAPI-named ones (see
 * {@link Qcow2CreateQapi}).
 * @throws {BlkError} EINVAL `Invalid parameter 'k'` for unknown options and bad values; ENOTSUP for
 *   options blk cannot create yet (preallocation, extended L2, zstd, encryption, external data file)
 */
export function qcow2CreateOptions(input: CreateQcow2Options | Qcow2CreateQapi): CreateQcow2Options {
  const o = input as unknown as Record<string, unknown>;
  const filename = o.filename;
  if (typeof filename !== "string") throw new BlkError("EINVAL", "Parameter 'filename' is missing");
  const out: CreateQcow2Options = { filename, size: sizeOption("size", o.size) };
  for (const [k0, v] of Object.entries(o)) {
    if (k0 === "filename" || k0 === "size" || v === undefined) continue;
    const k = k0.replaceAll("_", "-");
    switch (k) {
      case "clusterSize":
      case "cluster-size":
        out.clusterSize = sizeOption(k0, v);
        break;
      case "refcountBits":
      case "refcount-bits":
        out.refcountBits = sizeOption(k0, v);
        break;
      case "lazyRefcounts":
      case "lazy-refcounts":
        out.lazyRefcounts = boolOption(k0, v);
        break;
      case "compat":
      case "version":
        if (v === "0.10" || v === "v2") out.compat = "0.10";
        else if (v === "1.1" || v === "v3") out.compat = "1.1";
        else throw new BlkError("EINVAL", `Parameter 'version' does not accept value '${String(v)}'`);
        break;
      case "backingFile":
      case "backing-file":
        out.backingFile = String(v);
        break;
      case "backingFormat":
      case "backing-fmt":
        out.backingFormat = String(v);
        break;
      case "data-file":
      case "data-file-raw":
      case "encrypt-format":
        throw new BlkError("ENOTSUP", `qcow2 option '${k0}' is not supported by blk yet`);
      default: {
        if (!(k in ONLY)) throw new BlkError("EINVAL", `Invalid parameter '${k0}'`);
        const want = ONLY[k];
        const got = typeof want === "boolean" ? boolOption(k0, v) : v;
        if (got !== want)
          throw new BlkError("ENOTSUP", `qcow2 option '${k0}=${String(v)}' is not supported by blk yet`);
      }
    }
  }
  return out;
}

const MAX_L1_BYTES = 32 * 1024 * 1024;

const pad8 = (n: number): number => Math.ceil(n / 8) * 8;

/** Writes a big-endian u64 (below 2^53) at `at`. */
function put64(v: DataView, at: number, n: number): void {
  v.setUint32(at, Math.floor(n / 2 ** 32));
  v.setUint32(at + 4, n >>> 0);
}

/** The validated layout of a new image. */
interface Layout {
  size: number;
  clusterBits: number;
  clusterSize: number;
  version: 2 | 3;
  refcountOrder: number;
  l1Size: number;
  l1Clusters: number;
}

function plan(o: CreateQcow2Options): Layout {
  const rawSize = o.size;
  if (!Number.isSafeInteger(rawSize) || rawSize < 0) {
    throw new BlkError("EINVAL", "Invalid image size specified. Must be between 0 and 9223372036854775807.");
  }
  const size = Math.ceil(rawSize / 512) * 512;
  const cs = o.clusterSize ?? 65536;
  const clusterBits = Math.log2(cs);
  if (!Number.isInteger(clusterBits) || clusterBits < 9 || clusterBits > 21) {
    throw new BlkError("EINVAL", "Cluster size must be a power of two between 512 and 2048k");
  }
  const version = (o.compat ?? "1.1") === "0.10" ? 2 : 3;
  const bits = o.refcountBits ?? 16;
  const refcountOrder = Math.log2(bits);
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > 6) {
    throw new BlkError("EINVAL", "Refcount width must be a power of two and may not exceed 64 bits");
  }
  if (version === 2 && bits !== 16) {
    throw new BlkError(
      "EINVAL",
      "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)",
    );
  }
  if (version === 2 && o.lazyRefcounts === true) {
    throw new BlkError(
      "EINVAL",
      "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)",
    );
  }
  if (o.backingFormat !== undefined && o.backingFile === undefined) {
    throw new BlkError("EINVAL", "Backing format cannot be used without backing file");
  }
  if (o.backingFormat !== undefined && o.backingFormat.length >= 16) {
    throw new BlkError("EINVAL", `Invalid backing format '${o.backingFormat}'`);
  }
  if (o.backingFile !== undefined && Buffer.byteLength(o.backingFile) > 1023) {
    throw new BlkError("EINVAL", "Backing file name too long");
  }
  const perL2 = (cs / 8) * cs;
  const l1Size = Math.ceil(size / perL2);
  if (l1Size * 8 > MAX_L1_BYTES) throw new BlkError("EFBIG", "Image size is too large for this cluster size");
  const l1Clusters = Math.ceil((l1Size * 8) / cs);
  const perBlock = (cs * 8) / bits;
  if (3 + l1Clusters > perBlock) {
    throw new BlkError("ENOTSUP", "Image size is too large for one refcount block in this version of blk");
  }
  return { size, clusterBits, clusterSize: cs, version, refcountOrder, l1Size, l1Clusters };
}

/** Builds cluster 0 (header, extensions, backing file name). */
function buildHeader(o: CreateQcow2Options, p: Layout): Uint8Array {
  const cs = p.clusterSize;
  const buf = new Uint8Array(cs);
  const v = new DataView(buf.buffer);
  v.setUint32(0, QCOW2_MAGIC);
  v.setUint32(4, p.version);
  v.setUint32(20, p.clusterBits);
  put64(v, 24, p.size);
  v.setUint32(36, p.l1Size);
  put64(v, 40, p.l1Size === 0 ? 0 : 3 * cs);
  put64(v, 48, cs);
  v.setUint32(56, 1);
  let at = 72;
  if (p.version === 3) {
    v.setUint32(84, o.lazyRefcounts === true ? COMPAT_LAZY_REFCOUNTS : 0);
    v.setUint32(96, p.refcountOrder);
    v.setUint32(100, 112);
    at = 112;
  }
  const ext = (type: number, data: Uint8Array): void => {
    if (at + 8 + pad8(data.length) + 8 > cs)
      throw new BlkError("ENOSPC", "Header extensions do not fit in a cluster");
    v.setUint32(at, type);
    v.setUint32(at + 4, data.length);
    buf.set(data, at + 8);
    at += 8 + pad8(data.length);
  };
  if (o.backingFormat !== undefined) ext(QCOW2_EXT.BACKING_FORMAT, Buffer.from(o.backingFormat, "latin1"));
  if (p.version === 3 && cs > 4096) {
    ext(QCOW2_EXT.FEATURE_TABLE, featureNameTable());
  }
  at += 8; // end-of-extensions marker (all zero)
  if (o.backingFile !== undefined) {
    const name = Buffer.from(o.backingFile, "utf8");
    if (at + name.length > cs)
      throw new BlkError("ENOSPC", "Backing file name does not fit in the header cluster");
    buf.set(name, at);
    put64(v, 8, at);
    v.setUint32(16, name.length);
  }
  return buf;
}

/** Sets refcount entry `i` of a refcount block to `value` (`bits` wide, big-endian or LSB-first packed). */
export function setRefcount(block: Uint8Array, bits: number, i: number, value: number): void {
  if (bits < 8) {
    const bit = i * bits;
    const byte = bit >>> 3;
    const shift = bit & 7;
    const mask = ((1 << bits) - 1) << shift;
    block[byte] = ((block[byte] ?? 0) & ~mask) | ((value << shift) & mask);
    return;
  }
  const bytes = bits / 8;
  const at = i * bytes;
  let n = value;
  for (let k = bytes - 1; k >= 0; k--) {
    block[at + k] = n % 256;
    n = Math.floor(n / 256);
  }
}

/**
 * Creates a qcow2 image with the layout `qemu-img create -f qcow2` 7.2 writes (an existing file is
 * truncated first, with the file driver's lock check).
 * @throws {BlkError} EINVAL with QEMU's messages for bad options; ENOTSUP for L1 tables larger than the
 *   first refcount block covers; errors of the file driver
 * @example
 * await createQcow2({ filename: "top.qcow2", size: 1 << 30, backingFile: "base.qcow2", backingFormat: "qcow2" });
 */
export async function createQcow2(options: CreateQcow2Options): Promise<void> {
  const p = plan(options);
  const cs = p.clusterSize;
  const header = buildHeader(options, p);
  const reftable = new Uint8Array(cs);
  put64(new DataView(reftable.buffer), 0, 2 * cs);
  const refblock = new Uint8Array(cs);
  const bits = 2 ** p.refcountOrder;
  const used = 3 + (p.l1Size === 0 ? 0 : p.l1Clusters);
  for (let i = 0; i < used; i++) setRefcount(refblock, bits, i, 1);

  await fileDriver.create({ filename: options.filename, size: 0 });
  const graph = new BlockGraph();
  const node = await graph.open(fileDriver, { filename: options.filename }, { readOnly: false });
  try {
    const edge = graph.attach(backendParent(), node, {
      name: "create",
      perm: PERM.CONSISTENT_READ | PERM.WRITE | PERM.RESIZE,
    });
    try {
      await edge.write(0, header);
      await edge.write(cs, reftable);
      await edge.write(2 * cs, refblock);
      if (p.l1Size > 0) await edge.write(3 * cs, new Uint8Array(p.l1Size * 8));
      await edge.flush();
    } finally {
      edge.detach();
    }
  } finally {
    await graph.delete(node, { force: true });
  }
}
