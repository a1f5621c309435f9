/**
 * A filter node that shows `[base, base+length)` of its child as a whole device, finds zero runs in the
 * data written to it and can drop zero writes: `convert` writes each source through one, at the
 * source's place in the target, leaves zero runs of at least `-S` bytes unwritten, and drops zero writes
 * when the target is known to read as zeroes (a fresh image, `--target-is-zero`). With `-C` it passes copy
 * offload down to the target's file.
 */
import {
  type BlockDriver,
  type BlockGraph,
  type BlockNode,
  backendParent,
  CHILD_ROLE,
  type CopyRangeSource,
  type Edge,
  FilterDriverState,
  PERM,
  PERM_ALL,
  type WriteFlags,
  type ZeroFlags,
} from "@blk/core";
import { RawState } from "@blk/drivers";

/** Options of the window filter. */
export interface WindowOptions {
  base: number;
  length: number;
  /** Zero writes do nothing (the target already reads as zeroes). */
  dropZeroes: boolean;
  /** Zero runs of at least this many bytes inside written data become zero writes (0: none). */
  minSparse: number;
}

const SECTOR = 512;
/** Largest piece qemu-img convert examines at once (its 2 MiB buffer), in sectors. */
const PIECE_SECTORS = 4096;

/** A run of written data: `zero` runs are left unwritten (or written as zeroes). Offsets in bytes. */
export interface SparseRun {
  start: number;
  end: number;
  zero: boolean;
}

/**
 * Splits data written at 512-byte sector `sector` into data and zero runs the way qemu-img convert
 * does with `-S`: pieces of at most 2 MiB whose ends are aligned down to `align` sectors (the largest
 * power of two not above `-S`); in a piece, runs of equal sectors have their end aligned to `align`
 * (a data run's end up, a zero run's end down, and a zero run shorter than that tail counts as data);
 * a leading zero run is zero whatever its length; after data, zero runs shorter than `minSectors`
 * followed by more data stay part of the data.
 */
export function sparseRuns(buf: Uint8Array, sector: number, minSectors: number, align: number): SparseRun[] {
  const n = Math.ceil(buf.length / SECTOR);
  const zero = new Uint8Array(n);
  // Whole sectors are checked a word at a time when the buffer is aligned for it.
  const words =
    buf.byteOffset % 4 === 0 ? new Uint32Array(buf.buffer, buf.byteOffset, buf.length >>> 2) : null;
  let anyZero = false;
  for (let s = 0; s < n; s++) {
    let z = 1;
    const end = Math.min(buf.length, (s + 1) * SECTOR);
    if (words !== null && end - s * SECTOR === SECTOR) {
      for (let w = s * (SECTOR / 4), we = w + SECTOR / 4; w < we; w++) {
        if (words[w] !== 0) {
          z = 0;
          break;
        }
      }
    } else {
      for (let i = s * SECTOR; i < end; i++) {
        if (buf[i] !== 0) {
          z = 0;
          break;
        }
      }
    }
    zero[s] = z;
    if (z === 1) anyZero = true;
  }
  // No zero sector: all data, one run (what the run splitting below would find, only sooner).
  if (!anyZero) return n === 0 ? [] : [{ start: 0, end: buf.length, zero: false }];
  // One run from `p` (at most `len` sectors): is it data, and how long.
  const run = (p: number, len: number): { data: boolean; count: number } => {
    let isZero = zero[p] === 1;
    let i = 1;
    while (i < len && (zero[p + i] === 1) === isZero) i++;
    if (i === len) return { data: !isZero, count: i };
    const tail = (sector + p + i) % align;
    if (tail !== 0) {
      if (isZero && i <= tail) isZero = false;
      if (isZero) i -= tail;
      else i = Math.min(len, i + align - tail);
    }
    return { data: !isZero, count: i };
  };
  const runMin = (p: number, len: number): { data: boolean; count: number } => {
    const min = Math.min(minSectors, len);
    const first = run(p, len);
    if (!first.data) return first;
    let used = first.count;
    let checked = used;
    while (checked < len) {
      const r = run(p + checked, len - checked);
      checked += r.count;
      if (r.data) used = checked;
      else if (r.count >= min) break;
    }
    return { data: true, count: used };
  };
  const out: SparseRun[] = [];
  const push = (a: number, b: number, isZero: boolean): void => {
    const last = out.at(-1);
    if (last !== undefined && last.zero === isZero && last.end === a * SECTOR) last.end = b * SECTOR;
    else out.push({ start: a * SECTOR, end: b * SECTOR, zero: isZero });
  };
  let pos = 0;
  while (pos < n) {
    let pieceEnd = Math.min(n, pos + PIECE_SECTORS);
    const aligned = Math.floor((sector + pieceEnd) / align) * align - sector;
    if (aligned > pos) pieceEnd = aligned;
    for (let p = pos; p < pieceEnd; ) {
      const r = runMin(p, pieceEnd - p);
      push(p, p + r.count, !r.data);
      p += r.count;
    }
    pos = pieceEnd;
  }
  for (const r of out) r.end = Math.min(r.end, buf.length);
  return out;
}

/**
 * Where copy offload reaches `node`'s data: a `raw` node without an offset or size window, which no
 * probing guards, holds its file's bytes as they are, so offload goes to its `file` child (through the
 * raw node's edge) until the raw driver passes copy offload on itself; any other node is used as it is.
 */
export function offloadEnd(node: BlockNode): { node: BlockNode; via?: Edge } {
  const file = node.children.get("file");
  const state = node.closed ? undefined : node.state;
  if (
    state instanceof RawState &&
    state.probedGuard === undefined &&
    file !== undefined &&
    (file.role & CHILD_ROLE.FILTERED) !== 0
  ) {
    return { node: file.child, via: file };
  }
  return { node };
}

class WindowState extends FilterDriverState {
  readonly #o: WindowOptions;
  constructor(child: Edge, o: WindowOptions) {
    super(child);
    this.#o = o;
  }
  protected override _read(offset: number, buf: Uint8Array): Promise<void> {
    return this.child.readInto(offset + this.#o.base, buf);
  }
  protected override async _write(offset: number, data: Uint8Array, flags: WriteFlags): Promise<void> {
    const fua = flags.fua ?? false;
    if (this.#o.minSparse <= 0) {
      await this.child.write(offset + this.#o.base, data, { fua });
      return;
    }
    const minSectors = Math.max(1, Math.floor(this.#o.minSparse / SECTOR));
    let align = 1;
    while (align * 2 <= minSectors) align *= 2;
    const abs = offset + this.#o.base;
    // Runs are placed on the absolute sector grid (a write at an unaligned byte offset uses its sector).
    for (const r of sparseRuns(data, Math.floor(abs / SECTOR), minSectors, align)) {
      if (r.zero) await this._writeZeroes(offset + r.start, r.end - r.start, { mayUnmap: true, fua });
      else await this.child.write(offset + this.#o.base + r.start, data.subarray(r.start, r.end), { fua });
    }
  }
  protected override async _writeZeroes(offset: number, bytes: number, flags: ZeroFlags): Promise<void> {
    if (this.#o.dropZeroes) return;
    await this.child.writeZeroes(offset + this.#o.base, bytes, flags);
  }
  protected override async _discard(offset: number, bytes: number): Promise<void> {
    if (this.#o.dropZeroes) return;
    await this.child.discard(offset + this.#o.base, bytes);
  }
  protected override async _getLength(): Promise<number> {
    return this.#o.length;
  }

  /**
   * Copy offload into the child at the window's place. The data is not looked at, so no zero runs are
   * found in it (as with qemu-img -C); when offload is refused, the data is written and searched as usual.
   */
  copyRangeTo(src: CopyRangeSource, offset: number, bytes: number): Promise<void> {
    return this.request(async () => {
      const end = offloadEnd(this.child.child);
      const via = end.via ?? this.child;
      await end.node.copyRangeTo(src, offset + this.#o.base, bytes, { via });
    });
  }
}

/** The window filter driver (`x-blk-window`). */
const windowDriver: BlockDriver<WindowOptions> = {
  format: "x-blk-window",
  kind: "filter",
  async open(options: WindowOptions, ctx): Promise<WindowState> {
    const child = ctx.children.get("file");
    if (child === undefined) throw new Error("x-blk-window needs a file child");
    return new WindowState(child, options);
  },
};

/** A window over `target` with a writing user edge on it; `close()` removes both. */
export async function openWindow(
  graph: BlockGraph,
  target: BlockNode,
  options: WindowOptions,
): Promise<{ edge: Edge; close(): Promise<void> }> {
  const node = await graph.open(windowDriver, options, {
    children: { file: { node: target, role: CHILD_ROLE.FILTERED | CHILD_ROLE.PRIMARY } },
  });
  const edge = graph.attach(backendParent(), node, {
    name: "root",
    perm: PERM.CONSISTENT_READ | PERM.WRITE,
    shared: PERM_ALL,
  });
  return {
    edge,
    async close(): Promise<void> {
      edge.detach();
      await graph.delete(node, { force: true });
    },
  };
}
