/**
 * The `mirror_top` filter (QEMU 7.2 `block/mirror.c`, format name `mirror_top`): inserted above the mirror
 * source, it takes over the source's parents so that every guest write passes through it. Reads and
 * flushes go to the source. Writes, zero-writes and discards go to the source and then either mark the
 * job's dirty bitmap (background mode) or are handed to the job, which also writes them to the target
 * (write-blocking mode). The filter can be quiesced: new guest writes wait inside the filter and the
 * writes in flight finish, so the job can decide it has converged and switch the graph before any new
 * write proceeds (to whichever node the filter's child is by then). See `spec/jobs.md` §2.2, §2.5.
 */
import {
  BlkError,
  type BlockDriver,
  type BlockDriverInfo,
  type BlockNode,
  type DirtyBitmap,
  FilterDriverState,
  type OpenContext,
  PERM,
  type WriteFlags,
  type ZeroFlags,
} from "@blk/core";

/** A guest request that reached `mirror_top`. */
export interface MirrorGuestWrite {
  kind: "write" | "write-zeroes" | "discard";
  offset: number;
  bytes: number;
  /** The data (`write` only); do not keep it. */
  data?: Uint8Array;
  /** Zero-write flags (`write-zeroes` only). */
  flags?: ZeroFlags;
}

/** What the mirror job plugs into its filter for write-blocking mode. */
export interface MirrorTopClient {
  /**
   * Handles a guest write: must call `forward()` (the write to the source) and may do more (write the
   * target). Returns undefined to let the filter do its default (forward, then mark the bitmap).
   */
  activeWrite(req: MirrorGuestWrite, forward: () => Promise<void>): Promise<void> | undefined;
}

/** The open state of a `mirror_top` node. */
export class MirrorTopState extends FilterDriverState {
  /** The job's dirty bitmap (disabled: this filter marks it after each guest write reached the source). */
  bitmap: DirtyBitmap | undefined;
  /** The job, for write-blocking mode. */
  client: MirrorTopClient | undefined;
  /**
   * Once the filter's parents have moved away (job exit), guest writes still held or arriving here go
   * straight to this node (their permissions were checked when they entered the filter).
   */
  redirect: BlockNode | undefined;
  /** Told how many bytes (whole granules) each background-mode guest write newly dirtied. */
  onDirtied: ((bytes: number) => void) | undefined;
  #inFlight = 0;
  #idle: (() => void)[] = [];
  #gate: Promise<void> | undefined;
  #openGate: (() => void) | undefined;

  /** Guest writes inside the filter right now. */
  get guestWritesInFlight(): number {
    return this.#inFlight;
  }

  /** True while quiesced. */
  get quiesced(): boolean {
    return this.#gate !== undefined;
  }

  /**
   * Holds new guest writes at the filter's entry and resolves once the writes in flight have finished
   * (their dirty bits are marked by then). Idempotent.
   */
  async quiesce(): Promise<void> {
    if (this.#gate === undefined) {
      this.#gate = new Promise<void>((resolve) => (this.#openGate = resolve));
    }
    while (this.#inFlight > 0) await new Promise<void>((resolve) => this.#idle.push(resolve));
  }

  /** Lets held guest writes proceed (to the filter's child as it is now). Idempotent. */
  unquiesce(): void {
    const open = this.#openGate;
    this.#gate = undefined;
    this.#openGate = undefined;
    open?.();
  }

  async #guest(req: MirrorGuestWrite, forward: () => Promise<void>): Promise<void> {
    while (this.#gate !== undefined) await this.#gate;
    this.#inFlight++;
    try {
      const r = this.redirect;
      if (r !== undefined) {
        if (req.kind === "write") await r.write(req.offset, req.data ?? new Uint8Array(req.bytes));
        else if (req.kind === "write-zeroes") await r.writeZeroes(req.offset, req.bytes, req.flags ?? {});
        else await r.discard(req.offset, req.bytes);
        return;
      }
      const active = this.client?.activeWrite(req, forward);
      if (active !== undefined) {
        await active;
        return;
      }
      try {
        await forward();
      } finally {
        // Conservative, as QEMU: mark also when the write failed.
        const b = this.bitmap;
        if (b !== undefined && !b.released && req.bytes > 0) {
          const before = this.onDirtied === undefined ? 0 : b.count();
          b.setDirty(req.offset, req.bytes);
          if (this.onDirtied !== undefined) this.onDirtied(b.count() - before);
        }
      }
    } finally {
      this.#inFlight--;
      if (this.#inFlight === 0) {
        const idle = this.#idle;
        this.#idle = [];
        for (const w of idle) w();
      }
    }
  }

  protected override _write(offset: number, data: Uint8Array, flags: WriteFlags): Promise<void> {
    return this.#guest({ kind: "write", offset, bytes: data.length, data }, () =>
      super._write(offset, data, flags),
    );
  }

  protected override _writeZeroes(offset: number, bytes: number, flags: ZeroFlags): Promise<void> {
    return this.#guest({ kind: "write-zeroes", offset, bytes, flags }, () =>
      super._writeZeroes(offset, bytes, flags),
    );
  }

  protected override _discard(offset: number, bytes: number): Promise<void> {
    return this.#guest({ kind: "discard", offset, bytes }, () => super._discard(offset, bytes));
  }

  protected override _truncate(): Promise<void> {
    return Promise.reject(new BlkError("ENOTSUP", "Cannot resize a node with a block job running"));
  }

  protected override _info(): Promise<BlockDriverInfo> {
    return this.child.child.info();
  }
}

/** What `mirror_top` shares on its child while the job runs: everything but resize (QEMU's rule). */
const SHARED_WHILE_RUNNING = PERM.CONSISTENT_READ | PERM.WRITE | PERM.WRITE_UNCHANGED;

/**
 * The `mirror_top` filter driver (child `backing`): takes what its parents take, shares everything but
 * `resize`. Open it with {@link BlockGraph.open} and a `backing` child, then insert it above the source.
 */
export const mirrorTopDriver: BlockDriver<Record<string, never>> = {
  format: "mirror_top",
  kind: "filter",
  async open(_options: Record<string, never>, ctx: OpenContext): Promise<MirrorTopState> {
    const child = ctx.children.get("backing");
    if (child === undefined) throw new BlkError("EINVAL", "Parameter 'backing' is missing");
    return new MirrorTopState(child);
  },
  childPerm(_role: number, perm: number): { perm: number; shared: number } {
    return { perm, shared: SHARED_WHILE_RUNNING };
  },
};
