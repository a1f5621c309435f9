/**
 * DirtyBitmap: QEMU's BdrvDirtyBitmap over an {@link HBitmap} of the node's bytes: name, granularity,
 * enabled/busy/persistent/inconsistent/readonly state, the QMP-facing checks with QEMU's messages, and the
 * successor mechanism (create successor, abdicate, reclaim) that incremental backup relies on.
 */
import { HBitmap } from "@blk/hbitmap";
import { BlkError } from "./errors.ts";
import type { BlockNode } from "./node.ts";

/** Options of {@link BlockNode.createBitmap}. */
export interface DirtyBitmapOptions {
  /** Omit for an anonymous (internal) bitmap. */
  name?: string;
  /** Bytes per bit: a power of two ≥ 512 (default: the node's default granularity). */
  granularity?: number;
  /** Created disabled (ignores writes). */
  disabled?: boolean;
  /** Stored in the image on close (the driver must support it). */
  persistent?: boolean;
}

/** Which checks {@link DirtyBitmap.check} applies (QEMU's `BDRV_BITMAP_DEFAULT` / `BDRV_BITMAP_ALLOW_RO`). */
export type BitmapCheck = "default" | "allow-ro";

/** `BlockDirtyInfo` as `query-named-block-nodes` shows it. */
export interface BlockDirtyInfo {
  name?: string;
  recording: boolean;
  busy: boolean;
  persistent: boolean;
  granularity: number;
  count: number;
  inconsistent?: true;
}

/** Granularity check of `block-dirty-bitmap-add` (QEMU's message). @throws {BlkError} EINVAL */
export function checkBitmapGranularity(granularity: number): void {
  if (
    !Number.isSafeInteger(granularity) ||
    granularity < 512 ||
    (granularity & (granularity - 1)) !== 0 ||
    granularity > 2 ** 52
  ) {
    throw new BlkError("EINVAL", "Granularity must be power of 2 and at least 512");
  }
}

/**
 * A dirty bitmap of a node. Every write, write-zeroes and discard on the node marks its range (rounded
 * outward to granules) in every enabled bitmap. Create with {@link BlockNode.createBitmap}.
 * @example
 * const b = await node.createBitmap({ name: "b0", granularity: 65536 });
 * await node.write(65535, new Uint8Array(2));
 * b.count(); // 131072: granules 0 and 1
 */
export class DirtyBitmap {
  readonly node: BlockNode;
  /** Bytes per bit. */
  readonly granularity: number;
  #name: string | undefined;
  #hb: HBitmap;
  /** Ignores writes while true. */
  disabled: boolean;
  /** In use by an operation (backup, export, successor parent): QMP may not touch it. */
  busy = false;
  /** Stored into the image on close. */
  persistent: boolean;
  /** Found in use after an unclean shutdown: only removal is allowed. */
  inconsistent = false;
  /** Loaded from a read-only image: while set, writes to the node fail with `EPERM`. */
  readonly = false;
  #successor: DirtyBitmap | undefined;
  #released = false;

  /** @internal Use {@link BlockNode.createBitmap}. */
  constructor(node: BlockNode, options: DirtyBitmapOptions & { granularity: number; size: number }) {
    checkBitmapGranularity(options.granularity);
    if (options.persistent === true) {
      const can = node.state.canStoreBitmap;
      if (can === undefined) {
        throw new BlkError(
          "ENOTSUP",
          `Can't store persistent bitmaps to ${node.nodeName}: Operation not supported`,
        );
      }
      can.call(node.state, options.name ?? "", options.granularity);
    }
    this.node = node;
    this.#name = options.name;
    this.granularity = options.granularity;
    this.disabled = options.disabled ?? false;
    this.persistent = options.persistent ?? false;
    this.#hb = new HBitmap(options.size, Math.log2(options.granularity));
  }

  /** The name; undefined for anonymous bitmaps. */
  get name(): string | undefined {
    return this.#name;
  }

  /** The underlying HBitmap (items = bytes). */
  get hbitmap(): HBitmap {
    return this.#hb;
  }

  /** Not disabled. */
  get enabled(): boolean {
    return !this.disabled;
  }

  /** QEMU's `recording`: enabled, or frozen with an enabled successor. */
  get recording(): boolean {
    return !this.disabled || (this.#successor !== undefined && !this.#successor.disabled);
  }

  /** The successor installed by {@link DirtyBitmap.createSuccessor}. */
  get successor(): DirtyBitmap | undefined {
    return this.#successor;
  }

  /** Has a successor (frozen). */
  get frozen(): boolean {
    return this.#successor !== undefined;
  }

  /** Size in bytes the bitmap covers. */
  get size(): number {
    return this.#hb.size;
  }

  /** Dirty bytes (set bits × granularity). */
  count(): number {
    return this.#hb.count();
  }

  /** True if the granule holding `offset` is dirty. */
  get(offset: number): boolean {
    return this.#hb.get(offset);
  }

  /** Marks a byte range dirty (rounded outward to granules). */
  setDirty(offset: number, bytes: number): void {
    this.#hb.set(offset, bytes);
  }

  /** Clears a granule-aligned byte range (the tail may stop at the bitmap's size). */
  resetDirty(offset: number, bytes: number): void {
    this.#hb.reset(offset, bytes);
  }

  /** First dirty byte offset in `[offset, offset+bytes)`, or -1. */
  nextDirty(offset: number, bytes?: number): number {
    return this.#hb.nextDirty(offset, bytes);
  }

  /** First clean byte offset in `[offset, offset+bytes)`, or -1. */
  nextZero(offset: number, bytes?: number): number {
    return this.#hb.nextZero(offset, bytes);
  }

  /** The next dirty area in `[start, end)`, at most `maxBytes` long, or null. */
  nextDirtyArea(start: number, end: number, maxBytes?: number): { start: number; count: number } | null {
    return this.#hb.nextDirtyArea(start, end, maxBytes);
  }

  /** SHA-256 of the serialized bits (`x-debug-block-dirty-bitmap-sha256`). */
  sha256(): string {
    return this.#hb.sha256();
  }

  /**
   * QEMU's `bdrv_dirty_bitmap_check`: `default` refuses busy, readonly and inconsistent bitmaps;
   * `allow-ro` refuses busy and inconsistent ones.
   * @throws {BlkError} EBUSY / EPERM / EINVAL with QEMU's message
   */
  check(flags: BitmapCheck = "default"): void {
    const name = this.#name ?? "";
    if (this.busy) {
      throw new BlkError(
        "EBUSY",
        `Bitmap '${name}' is currently in use by another operation and cannot be used`,
      );
    }
    if (flags === "default" && this.readonly) {
      throw new BlkError("EPERM", `Bitmap '${name}' is readonly and cannot be modified`);
    }
    if (this.inconsistent) {
      throw new BlkError("EINVAL", `Bitmap '${name}' is inconsistent and cannot be used`);
    }
  }

  /**
   * `block-dirty-bitmap-clear`: checks `default`, then clears every bit.
   * @returns the bits before, for rollback with {@link DirtyBitmap.restore} (transactions)
   */
  clear(): HBitmap {
    this.check("default");
    const backup = this.#hb.clone();
    this.#hb.resetAll();
    return backup;
  }

  /** `block-dirty-bitmap-enable`: checks `allow-ro`. */
  enable(): void {
    this.check("allow-ro");
    this.disabled = false;
  }

  /** `block-dirty-bitmap-disable`: checks `allow-ro`. */
  disable(): void {
    this.check("allow-ro");
    this.disabled = true;
  }

  /**
   * Merges `src` into this bitmap (`block-dirty-bitmap-merge`): this must pass `default`, `src` must pass
   * `allow-ro`, and both must cover the same number of bytes; granularities may differ.
   * @returns a copy of this bitmap's bits before the merge, for rollback with {@link DirtyBitmap.restore}
   */
  merge(src: DirtyBitmap): HBitmap {
    this.check("default");
    src.check("allow-ro");
    return this.mergeUnchecked(src);
  }

  /**
   * `block-dirty-bitmap-merge` with several sources: checks this bitmap (`default`), then merges every
   * source (each checked `allow-ro`, sizes must match) into a scratch copy, and only then into this one, so
   * any error leaves it untouched.
   * @returns a copy of this bitmap's bits before the merge, for rollback with {@link DirtyBitmap.restore}
   */
  mergeAll(sources: readonly DirtyBitmap[]): HBitmap {
    this.check("default");
    const scratch = new HBitmap(this.size, this.#hb.granularity);
    for (const src of sources) {
      src.check("allow-ro");
      this.#checkSize(src);
      HBitmap.merge(scratch, src.#hb, scratch);
    }
    const backup = this.#hb.clone();
    HBitmap.merge(this.#hb, scratch, this.#hb);
    return backup;
  }

  #checkSize(src: DirtyBitmap): void {
    if (this.size !== src.size) {
      throw new BlkError(
        "EINVAL",
        `Bitmaps are of different sizes (destination size is ${this.size}, source size is ${src.size}) and can't be merged`,
      );
    }
  }

  /** Merge without the QMP checks (internal users: successors, jobs). Sizes must still match. */
  mergeUnchecked(src: DirtyBitmap): HBitmap {
    this.#checkSize(src);
    const backup = this.#hb.clone();
    HBitmap.merge(this.#hb, src.#hb, this.#hb);
    return backup;
  }

  /** Replaces the bits with a saved copy (transaction rollback of clear/merge). */
  restore(saved: HBitmap): void {
    this.#hb = saved;
  }

  /**
   * Freezes this bitmap for an operation: an anonymous successor with the same granularity takes the new
   * writes (it inherits this bitmap's enabled state); this bitmap becomes disabled and busy.
   * @throws {BlkError} EBUSY if busy; EINVAL `Cannot create a successor for a bitmap that already has one`
   */
  createSuccessor(): DirtyBitmap {
    this.check("allow-ro");
    if (this.#successor !== undefined) {
      throw new BlkError("EINVAL", "Cannot create a successor for a bitmap that already has one");
    }
    const s = new DirtyBitmap(this.node, {
      granularity: this.granularity,
      size: this.size,
      disabled: this.disabled,
    });
    this.node._addBitmap(s);
    this.#successor = s;
    this.disabled = true;
    this.busy = true;
    return s;
  }

  /**
   * Success path: the successor takes this bitmap's name and persistence, and this bitmap is released.
   * @returns the successor, now the bitmap of that name
   * @throws {BlkError} EINVAL `Cannot relinquish control if there's no successor present`
   */
  abdicate(): DirtyBitmap {
    const s = this.#successor;
    if (s === undefined)
      throw new BlkError("EINVAL", "Cannot relinquish control if there's no successor present");
    s.#name = this.#name;
    s.persistent = this.persistent;
    this.#name = undefined;
    this.persistent = false;
    this.#successor = undefined;
    this.busy = false;
    this.#release();
    return s;
  }

  /**
   * Failure path: this bitmap takes back the successor's bits (union), its enabled state, stops being busy,
   * and the successor is released. Nothing is lost.
   * @throws {BlkError} EINVAL `Cannot reclaim a successor when none is present`
   */
  reclaim(): DirtyBitmap {
    const s = this.#successor;
    if (s === undefined) throw new BlkError("EINVAL", "Cannot reclaim a successor when none is present");
    HBitmap.merge(this.#hb, s.#hb, this.#hb);
    this.disabled = s.disabled;
    this.busy = false;
    this.#successor = undefined;
    s.#release();
    return this;
  }

  /**
   * `block-dirty-bitmap-remove`: checks busy and readonly, deletes a persistent bitmap from the image,
   * and drops the bitmap from its node.
   */
  async remove(): Promise<void> {
    if (this.busy) this.check("allow-ro");
    if (this.readonly) this.check("default");
    if (this.persistent && this.#name !== undefined) {
      await this.node.state.removePersistentBitmap?.(this.#name);
    }
    this.#release();
  }

  /** Drops an internal (anonymous) bitmap from its node. @throws {BlkError} EBUSY if busy or frozen */
  release(): void {
    if (this.busy || this.#successor !== undefined) {
      throw new BlkError(
        "EBUSY",
        `Bitmap '${this.#name ?? ""}' is currently in use by another operation and cannot be used`,
      );
    }
    this.#release();
  }

  /** True once released (removed from its node). */
  get released(): boolean {
    return this.#released;
  }

  #release(): void {
    this.#released = true;
    this.node._dropBitmap(this);
  }

  /** `BlockDirtyInfo` for queries. */
  info(): BlockDirtyInfo {
    const out: BlockDirtyInfo = {
      recording: this.recording,
      busy: this.busy,
      persistent: this.persistent,
      granularity: this.granularity,
      count: this.count(),
    };
    if (this.#name !== undefined) out.name = this.#name;
    if (this.inconsistent) out.inconsistent = true;
    return out;
  }

  /** @internal Truncate check (QEMU asserts; blk refuses). */
  assertTruncatable(): void {
    if (this.busy || this.#successor !== undefined) {
      throw new BlkError(
        "EBUSY",
        `Bitmap '${this.#name ?? ""}' is currently in use by another operation and cannot be used`,
      );
    }
  }

  /**
   * @internal Replaces the bits with a loaded copy (same size and granularity required).
   * @throws {BlkError} EINVAL on a mismatch
   */
  _load(bits: HBitmap): void {
    if (bits.size !== this.#hb.size || 2 ** bits.granularity !== this.granularity) {
      throw new BlkError(
        "EINVAL",
        `Bitmap '${this.#name ?? ""}' does not match the node's size or granularity`,
      );
    }
    this.#hb = bits;
  }

  /** @internal Node resize. */
  _truncate(size: number): void {
    this.#hb.truncate(size);
  }

  /** @internal A write finished on the node. */
  _markWrite(offset: number, bytes: number): void {
    if (!this.disabled) this.#hb.set(offset, bytes);
  }
}
