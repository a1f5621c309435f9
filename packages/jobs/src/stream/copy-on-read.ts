/**
 * The `copy-on-read` filter (QEMU 7.2 `block/copy-on-read.c`, child `file`, option `bottom`): inserted
 * above the stream job's device, it takes over the device's parents. A read through it first copies
 * whatever the range gets from the layers between the device's backing and `bottom` (inclusive) into the
 * device, then reads; writes pass through. A copy and the guest writes it overlaps never run at the same
 * time (the copy is a serialising request in the filter's own request tracker), so a copy never writes
 * stale backing data over a newer guest write. The stream job copies through {@link CopyOnReadState.populate}.
 * See `spec/jobs.md` §5.
 */
import {
  BlkError,
  type BlockDriver,
  type BlockNode,
  type Edge,
  FilterDriverState,
  type OpenContext,
  PERM,
  PERM_ALL,
  type TruncateFlags,
  type WriteFlags,
  type ZeroFlags,
} from "@blk/core";
import { RequestTracker } from "@blk/notifiers";
import { backingOf } from "./chain.ts";

/** Largest copy buffer a `copy-on-read` node keeps between copies: one batched stream request (4 MiB). */
const SPARE_MAX = 8 * 524_288;

/** Options of the `copy-on-read` driver (QAPI `BlockdevOptionsCor`). */
export interface CopyOnReadOptions {
  /** Node name of the lowest node whose data is copied; default: the whole chain below the device. */
  bottom?: string;
}

/** The open state of a `copy-on-read` node. */
export class CopyOnReadState extends FilterDriverState {
  /** The first node not copied from (below `bottom`); undefined: the whole chain is copied. */
  readonly base: BlockNode | undefined;
  /** Guest reads populate the device (true by default; the stream job turns it off once it finished). */
  populateOnRead = true;
  readonly #tracker = new RequestTracker();
  #spare: Uint8Array | undefined;

  constructor(child: Edge, base?: BlockNode) {
    super(child);
    this.base = base;
  }

  /**
   * Copies into the filtered node (the device) what `[offset, offset + bytes)` reads from the layers
   * between its backing and `bottom`, skipping what the device allocates itself; guest writes through the
   * filter that overlap wait, and the copy waits for those in flight. Returns the bytes copied.
   * @throws {BlkError} the read or write error
   */
  async populate(offset: number, bytes: number): Promise<number> {
    const end = Math.min(offset + bytes, this.child.length);
    if (end <= offset) return 0;
    const lock = this.#tracker.begin({ offset, bytes: end - offset, serialising: true, kind: "copy" });
    try {
      await lock.waitForOverlapping();
      const device = this.child.child;
      const extents = await device.blockStatusAbove(offset, end - offset, { base: this.base ?? null });
      let copied = 0;
      let spare: Uint8Array | undefined;
      try {
        for (const e of extents) {
          if (!e.allocated || (e.depth ?? 0) === 0) continue;
          spare ??= this.#takeSpare(end - offset);
          const buf = spare.length >= e.length ? spare.subarray(0, e.length) : new Uint8Array(e.length);
          await this.child.readInto(e.offset, buf);
          await this.child.write(e.offset, buf, { writeUnchanged: true });
          copied += e.length;
        }
      } finally {
        if (spare !== undefined) this.#spare ??= spare;
      }
      return copied;
    } finally {
      lock.end();
    }
  }

  /**
   * A copy buffer for a copy of `bytes` (extents longer than it get their own): the one kept from the
   * previous copy, so the stream job does not allocate a buffer per chunk; concurrent copies get new ones.
   */
  #takeSpare(bytes: number): Uint8Array {
    const spare = this.#spare;
    this.#spare = undefined;
    return spare ?? new Uint8Array(Math.min(bytes, SPARE_MAX));
  }

  async #guestWrite(offset: number, bytes: number, fn: () => Promise<void>): Promise<void> {
    const req = this.#tracker.begin({ offset, bytes, kind: "write" });
    try {
      await req.waitForOverlapping();
      await fn();
    } finally {
      req.end();
    }
  }

  protected override async _read(offset: number, buf: Uint8Array): Promise<void> {
    if (this.populateOnRead) await this.populate(offset, buf.length);
    await super._read(offset, buf);
  }

  protected override _write(offset: number, data: Uint8Array, flags: WriteFlags): Promise<void> {
    return this.#guestWrite(offset, data.length, () => super._write(offset, data, flags));
  }

  protected override _writeZeroes(offset: number, bytes: number, flags: ZeroFlags): Promise<void> {
    return this.#guestWrite(offset, bytes, () => super._writeZeroes(offset, bytes, flags));
  }

  protected override _discard(offset: number, bytes: number): Promise<void> {
    return this.#guestWrite(offset, bytes, () => super._discard(offset, bytes));
  }

  protected override _truncate(_length: number, _flags: TruncateFlags): Promise<void> {
    return Promise.reject(new BlkError("ENOTSUP", "Cannot resize a node with a block job running"));
  }
}

/**
 * The `copy-on-read` filter driver (child `file`): takes what its parents take plus `write-unchanged`
 * (its copies rewrite data the device already shows), shares what they share plus `write-unchanged`.
 * @example
 * const cor = await graph.openFilterAbove(copyOnReadDriver, { bottom: "mid" }, top);
 */
export const copyOnReadDriver: BlockDriver<CopyOnReadOptions> = {
  format: "copy-on-read",
  kind: "filter",
  async open(options: CopyOnReadOptions, ctx: OpenContext): Promise<CopyOnReadState> {
    const child = ctx.children.get("file");
    if (child === undefined) throw new BlkError("EINVAL", "Parameter 'file' is missing");
    let base: BlockNode | undefined;
    if (options.bottom !== undefined) {
      const bottom = child.graph.find(options.bottom);
      if (bottom === undefined) {
        throw new BlkError("ENOENT", `Cannot find device='' nor node-name='${options.bottom}'`);
      }
      base = backingOf(bottom);
    }
    return new CopyOnReadState(child, base);
  },
  childPerm(_role: number, perm: number, shared: number): { perm: number; shared: number } {
    return {
      perm: (perm & PERM_ALL) | PERM.WRITE_UNCHANGED,
      shared: (shared & PERM_ALL) | PERM.WRITE_UNCHANGED,
    };
  },
};
