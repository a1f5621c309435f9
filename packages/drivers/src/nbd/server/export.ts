/**
 * One NBD export: a {@link BlockNode} attached under an unnamed BlockBackend parent (edge `root`, holding
 * consistent-read, plus write when writable, and sharing everything, as QEMU's block exports do), its
 * advertised flags and block sizes, and its metadata contexts with QEMU's fixed ids
 * (`base:allocation` 0, `qemu:allocation-depth` 1, `qemu:dirty-bitmap:NAME` 2 + i). A bitmap named
 * alone is looked up on the exported node and then down its chain (through filters to their filtered
 * child, through formats to their backing child — never a format's `file`), as QEMU 7.2 does; its
 * context then reads that bitmap, with its own granularity and size.
 */
import {
  BlkError,
  type BlockNode,
  backendParent,
  type DirtyBitmap,
  type Edge,
  isBlkError,
  PERM,
  PERM_ALL,
  strerror,
} from "@blk/core";
import {
  META_BASE_ALLOCATION,
  META_QEMU_ALLOCATION_DEPTH,
  META_QEMU_DIRTY_BITMAP_PREFIX,
  NBD_MAX_PAYLOAD,
  NBD_MAX_STRING,
  NBD_STATE,
  NBD_STATE_DIRTY,
  NBD_TFLAG,
} from "../protocol/constants.ts";
import type { NbdExtent } from "../protocol/encode.ts";

/** Options of {@link NbdServer.addExport} (QEMU's `BlockExportOptionsNbd` members, camel-cased). */
export interface NbdExportOptions {
  /** Export name clients ask for (default: the node name). At most 4096 bytes. */
  name?: string;
  /** The node to export. */
  node: BlockNode;
  /** Free-form description sent with `NBD_INFO_DESCRIPTION` and `NBD_REP_SERVER`. */
  description?: string;
  /** Allow writes (default false: the export is read-only). */
  writable?: boolean;
  /**
   * Dirty bitmaps exposed as `qemu:dirty-bitmap:NAME` (QEMU's `BlockDirtyBitmapOrStr`): a name is looked
   * up on `node`, then down its filter/backing chain ({@link findChainBitmap}), and refused when enabled
   * on a writable node of a read-only export; `{node, name}` names the node (any node of the graph) and
   * skips that check. The same bitmap may be listed twice (two contexts of the same name), as in QEMU.
   */
  bitmaps?: readonly (string | NbdExportBitmap)[];
  /** Expose `qemu:allocation-depth`. */
  allocationDepth?: boolean;
  /**
   * Advertise `NBD_FLAG_CAN_MULTI_CONN` (default true, as qemu-storage-daemon 7.2 does for read-only
   * and writable exports alike). Safe here: every connection reads and writes the same node, and a
   * FLUSH flushes that node, so it covers writes completed on any connection. Set false to mimic
   * qemu-nbd's default (`--shared=1`).
   */
  multiConn?: boolean;
  /** Largest READ/WRITE payload advertised and accepted (default 32 MiB). */
  maxPayload?: number;
}

/** A bitmap of a given node (QEMU's `BlockDirtyBitmap`). */
export interface NbdExportBitmap {
  /** Node name, looked up in the exported node's graph. */
  node: string;
  name: string;
}

/**
 * The bitmap `name` of `node` or of the first node down its chain that has one (QEMU's search through
 * `bdrv_filter_or_cow_bs`): a filter leads to its filtered child, any other node to its backing child;
 * a format's `file` (even raw's, which blk gives the filtered role) is not followed.
 */
export function findChainBitmap(node: BlockNode, name: string): DirtyBitmap | undefined {
  for (let n: BlockNode | undefined = node; n !== undefined; ) {
    const bm = n.getBitmap(name);
    if (bm !== undefined) return bm;
    n = n.driver.kind === "filter" ? n.filtered : n.backing;
  }
  return undefined;
}

/**
 * QEMU 7.2's checks of an export's bitmaps, in its order and with its messages: lookup (`Bitmap 'X' is
 * not found`; for `{node, name}`, `Node 'N' not found` / `Dirty bitmap 'X' not found`), then for a name
 * an enabled bitmap on a writable node of a read-only export, then busy and inconsistent.
 */
function resolveBitmap(node: BlockNode, ref: string | NbdExportBitmap, readOnly: boolean): DirtyBitmap {
  let bm: DirtyBitmap | undefined;
  if (typeof ref === "string") {
    bm = findChainBitmap(node, ref);
    if (bm === undefined) throw new BlkError("ENOENT", `Bitmap '${ref}' is not found`);
    if (readOnly && !bm.node.readOnly && bm.enabled) {
      throw new BlkError("EINVAL", `Enabled bitmap '${ref}' incompatible with readonly export`);
    }
  } else {
    const owner = node.graph.find(ref.node);
    if (owner === undefined) throw new BlkError("ENOENT", `Node '${ref.node}' not found`);
    bm = owner.getBitmap(ref.name);
    if (bm === undefined) throw new BlkError("ENOENT", `Dirty bitmap '${ref.name}' not found`);
  }
  bm.check("allow-ro");
  return bm;
}

/** A metadata context an export offers. */
export interface NbdMetaContext {
  id: number;
  name: string;
  kind: "base:allocation" | "allocation-depth" | "dirty-bitmap";
  bitmap?: DirtyBitmap;
}

/** A run of a sparse READ reply: data, or zeroes sent as a hole. */
export interface NbdReadRun {
  offset: number;
  length: number;
  zero: boolean;
}

/**
 * Granularity of an export's known-data cache: sparse READs of a window found to be all data skip the
 * block-status query. Reads from the node always return what it holds, so a stale entry (another user
 * of the node punched a hole since) only costs a hole sent as zeroed data.
 */
const DATA_WINDOW = 1 << 20;
/** At most this many windows are remembered (64 GiB of data); beyond, the cache starts over. */
const MAX_DATA_WINDOWS = 65536;

/** At most this many extents per block-status chunk (QEMU's cap: 1 MiB of extent data). */
export const NBD_MAX_BLOCK_STATUS_EXTENTS = 131072;

const utf8 = new TextEncoder();

/** A live export. Created by {@link NbdServer.addExport}. */
export class NbdExport {
  readonly name: string;
  readonly description: string | undefined;
  readonly writable: boolean;
  readonly multiConn: boolean;
  readonly maxPayload: number;
  /** Offered contexts in id order. */
  readonly contexts: readonly NbdMetaContext[];
  readonly edge: Edge;
  #removed = false;
  /** Indexes of {@link DATA_WINDOW}-sized windows known to hold data only (no holes, no zero ranges). */
  #dataWindows = new Set<number>();
  /** The node {@link NbdExport.#dataWindows} describes (the cache is dropped when the edge moves). */
  #dataWindowsOf: BlockNode | undefined;

  /** @internal Use {@link NbdServer.addExport}. @throws {BlkError} */
  constructor(options: NbdExportOptions) {
    const node = options.node;
    // QEMU's generic export layer refuses this before any NBD option is looked at.
    if (options.writable === true && node.readOnly) {
      throw new BlkError("EPERM", "Cannot export read-only node as writable");
    }
    const name = options.name ?? node.nodeName;
    if (utf8.encode(name).length > NBD_MAX_STRING) {
      throw new BlkError("EINVAL", "export name too long");
    }
    if (options.description !== undefined && utf8.encode(options.description).length > NBD_MAX_STRING) {
      throw new BlkError("EINVAL", "description too long");
    }
    const maxPayload = options.maxPayload ?? NBD_MAX_PAYLOAD;
    if (!Number.isInteger(maxPayload) || maxPayload < 4096 || maxPayload > NBD_MAX_PAYLOAD) {
      throw new BlkError("EINVAL", `maxPayload must be in [4096, ${NBD_MAX_PAYLOAD}]`);
    }
    this.name = name;
    this.description = options.description;
    this.writable = options.writable ?? false;
    this.multiConn = options.multiConn ?? true;
    this.maxPayload = maxPayload;
    const contexts: NbdMetaContext[] = [{ id: 0, name: META_BASE_ALLOCATION, kind: "base:allocation" }];
    if (options.allocationDepth === true) {
      contexts.push({ id: 1, name: META_QEMU_ALLOCATION_DEPTH, kind: "allocation-depth" });
    }
    // All are checked before any is marked busy, so a bitmap listed twice passes (QEMU allows it).
    const bitmaps: DirtyBitmap[] = [];
    for (const [i, ref] of (options.bitmaps ?? []).entries()) {
      const bm = resolveBitmap(node, ref, !this.writable);
      bitmaps.push(bm);
      contexts.push({
        id: 2 + i,
        name: META_QEMU_DIRTY_BITMAP_PREFIX + (typeof ref === "string" ? ref : ref.name),
        kind: "dirty-bitmap",
        bitmap: bm,
      });
    }
    this.contexts = contexts;
    const perm = PERM.CONSISTENT_READ | (this.writable ? PERM.WRITE : 0);
    this.edge = node.graph.attach(backendParent(), node, { name: "root", perm, shared: PERM_ALL });
    for (const b of bitmaps) b.busy = true;
  }

  /**
   * The node the export serves now: its edge's child, which a completed mirror (or any node replacement)
   * moves to another node.
   */
  get node(): BlockNode {
    return this.edge.child;
  }

  /** Current size in bytes. */
  get size(): number {
    return this.node.length;
  }

  /** The minimum block size advertised (the node's request alignment, at least 1). */
  get minBlock(): number {
    return Math.max(1, this.node.state.limits.requestAlignment);
  }

  /** The preferred block size advertised. */
  get preferredBlock(): number {
    return Math.max(4096, this.minBlock);
  }

  /** Transmission flags for a connection (DF only with structured replies). */
  transmissionFlags(structured: boolean): number {
    let f = NBD_TFLAG.HAS_FLAGS | NBD_TFLAG.SEND_FLUSH | NBD_TFLAG.SEND_FUA | NBD_TFLAG.SEND_CACHE;
    if (this.writable) {
      f |= NBD_TFLAG.SEND_TRIM | NBD_TFLAG.SEND_WRITE_ZEROES | NBD_TFLAG.SEND_FAST_ZERO;
    } else {
      f |= NBD_TFLAG.READ_ONLY;
    }
    if (structured) f |= NBD_TFLAG.SEND_DF;
    if (this.multiConn) f |= NBD_TFLAG.CAN_MULTI_CONN;
    return f;
  }

  /**
   * Contexts matching a LIST (`list` true) or SET query. Unknown namespaces and leaves match nothing;
   * in LIST, `base:`, `qemu:` and `qemu:dirty-bitmap:` are wildcards. A full name matches its first
   * context only (a bitmap exported twice answers with its first id, as QEMU's server does).
   */
  matchContexts(query: string, list: boolean): NbdMetaContext[] {
    const out: NbdMetaContext[] = [];
    for (const c of this.contexts) {
      if (c.name === query) {
        out.push(c);
        break;
      } else if (list && (query === "base:" || query === "qemu:") && c.name.startsWith(query)) out.push(c);
      else if (list && query === META_QEMU_DIRTY_BITMAP_PREFIX && c.kind === "dirty-bitmap") out.push(c);
    }
    return out;
  }

  /** True once removed from its server. */
  get removed(): boolean {
    return this.#removed;
  }

  /** @internal Detaches from the graph and releases the bitmaps. */
  _release(): void {
    if (this.#removed) return;
    this.#removed = true;
    for (const c of this.contexts) if (c.bitmap !== undefined) c.bitmap.busy = false;
    this.node.graph.detach(this.edge);
  }

  /**
   * How a sparse READ of `[offset, offset+length)` (length > 0, inside the export) is answered: runs of
   * data and of zeroes (holes), or undefined when it is all data (one data chunk). A read inside one
   * window asks the block status of the whole window and remembers a window that is all data.
   * @throws {BlkError} `unable to check for holes: <strerror>` when block status fails (QEMU answers the
   *   READ with that error rather than guessing the range is data)
   */
  async sparseRuns(offset: number, length: number): Promise<NbdReadRun[] | undefined> {
    const node = this.node;
    if (this.#dataWindowsOf !== node) {
      this.#dataWindows.clear();
      this.#dataWindowsOf = node;
    }
    const w = Math.floor(offset / DATA_WINDOW);
    const oneWindow = Math.floor((offset + length - 1) / DATA_WINDOW) === w;
    if (oneWindow && this.#dataWindows.has(w)) return undefined;
    const start = oneWindow ? w * DATA_WINDOW : offset;
    const end = oneWindow ? Math.min(start + DATA_WINDOW, this.size) : offset + length;
    if (end < offset + length) return undefined; // the export shrank meanwhile: the read will tell
    let extents: { offset: number; length: number; zero: boolean }[];
    try {
      extents = await node.blockStatusAbove(start, end - start);
    } catch (e) {
      const code = isBlkError(e) ? e.code : "EIO";
      throw new BlkError(code, `unable to check for holes: ${strerror(code)}`, { cause: e });
    }
    const first = extents[0];
    if (
      oneWindow &&
      extents.length === 1 &&
      first !== undefined &&
      !first.zero &&
      first.length === end - start
    ) {
      if (this.#dataWindows.size >= MAX_DATA_WINDOWS) this.#dataWindows.clear();
      this.#dataWindows.add(w);
      return undefined;
    }
    // Clip to the request and merge neighbours of the same kind.
    const runs: NbdReadRun[] = [];
    const stop = offset + length;
    for (const e of extents) {
      const a = Math.max(e.offset, offset);
      const b = Math.min(e.offset + e.length, stop);
      if (b <= a) continue;
      const last = runs.at(-1);
      if (last !== undefined && last.zero === e.zero && last.offset + last.length === a) last.length += b - a;
      else runs.push({ offset: a, length: b - a, zero: e.zero });
    }
    const covered = runs.reduce((n, r) => n + r.length, 0);
    const only = runs[0];
    if (covered !== length || only === undefined || only.offset !== offset) return undefined;
    if (runs.length === 1 && !only.zero) return undefined;
    return runs;
  }

  /** Forgets what the known-data cache says about `[offset, offset+length)` (after TRIM, WRITE_ZEROES). */
  forgetData(offset: number, length: number): void {
    if (this.#dataWindows.size === 0 || length <= 0) return;
    const first = Math.floor(offset / DATA_WINDOW);
    const last = Math.floor((offset + length - 1) / DATA_WINDOW);
    if (last - first >= this.#dataWindows.size) {
      for (const w of this.#dataWindows) if (w >= first && w <= last) this.#dataWindows.delete(w);
    } else {
      for (let w = first; w <= last; w++) this.#dataWindows.delete(w);
    }
  }

  /**
   * Block status of `[offset, offset+length)` for each context (in the order given), extents merged and
   * clipped to the range; with `reqOne`, one extent per context.
   */
  async blockStatus(
    contexts: readonly NbdMetaContext[],
    offset: number,
    length: number,
    reqOne: boolean,
  ): Promise<NbdExtent[][]> {
    const end = Math.min(offset + length, this.size);
    const max = reqOne ? 1 : NBD_MAX_BLOCK_STATUS_EXTENTS;
    const needChain = contexts.some((c) => c.kind !== "dirty-bitmap");
    const chain = needChain ? await this.node.blockStatusAbove(offset, end - offset) : [];
    return contexts.map((c) => {
      const out: NbdExtent[] = [];
      const add = (len: number, flags: number): boolean => {
        const last = out.at(-1);
        if (last !== undefined && last.flags === flags) last.length += len;
        else {
          if (out.length >= max) return false;
          out.push({ length: len, flags });
        }
        return true;
      };
      if (c.kind === "dirty-bitmap") {
        const bm = c.bitmap;
        let pos = offset;
        const bend = Math.min(end, bm?.size ?? 0);
        while (bm !== undefined && pos < bend) {
          const dirty = bm.get(pos);
          const next = dirty ? bm.nextZero(pos, bend - pos) : bm.nextDirty(pos, bend - pos);
          const stop = next < 0 || next > bend ? bend : Math.max(next, pos + 1);
          if (!add(stop - pos, dirty ? NBD_STATE_DIRTY : 0)) break;
          pos = stop;
        }
        if (pos < end && out.length < max) add(end - pos, 0);
      } else {
        for (const e of chain) {
          const flags =
            c.kind === "base:allocation"
              ? (e.data ? 0 : NBD_STATE.HOLE) | (e.zero ? NBD_STATE.ZERO : 0)
              : e.allocated
                ? (e.depth ?? 0) + 1
                : 0;
          if (!add(e.length, flags)) break;
        }
      }
      // Extents never exceed the u32 request length, so they fit the wire's u32 field.
      return out;
    });
  }
}
