/**
 * The `raw` format driver: the guest sees the `file` child's bytes, optionally a window of them
 * (`offset`, `size`), with QEMU's checks and messages. Without a window it passes permissions through
 * like a filter (as QEMU's raw does); with one it refuses to let others resize the file.
 */
import {
  BlkError,
  type BlockDriver,
  BlockDriverBase,
  type BlockDriverInfo,
  type BlockStatusExtent,
  CHILD_ROLE,
  defaultChildPerm,
  type Edge,
  type FlushFlags,
  type OpenContext,
  PERM,
  type TruncateFlags,
  type WriteFlags,
  type ZeroFlags,
} from "@blk/core";
import { expectInt, expectObject, rejectUnexpected } from "../registry/options.ts";

/** `BlockdevOptionsRaw` (the `file` child is passed as a graph child, not here). */
export interface RawOptions {
  /** Start of the guest's window in the file (bytes, default 0). */
  offset?: number;
  /** Length of the window (bytes, multiple of 512; default: the rest of the file). Fixes the size. */
  size?: number;
}

/** QEMU's warning for a writable image whose format was probed as raw. */
export const PROBED_RAW_WARNING: string =
  "WARNING: Image format was not specified for '%s' and probing guessed raw.\n" +
  "         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n" +
  "         Specify the 'raw' format explicitly to remove the restrictions.";

/** {@link PROBED_RAW_WARNING} for `filename`. */
export function probedRawWarning(filename: string): string {
  return PROBED_RAW_WARNING.replace("%s", filename);
}

const SECTOR = 512;
const roundUp = (n: number): number => Math.ceil(n / SECTOR) * SECTOR;

/** The child role a `raw` node's `file` edge has (QEMU: filtered without a window, data with one). */
export function rawChildRole(options: RawOptions = {}): number {
  const windowed = (options.offset ?? 0) !== 0 || options.size !== undefined;
  return windowed ? CHILD_ROLE.DATA | CHILD_ROLE.PRIMARY : CHILD_ROLE.FILTERED | CHILD_ROLE.PRIMARY;
}

/** The open state of a `raw` node. */
export class RawState extends BlockDriverBase {
  readonly #file: Edge;
  readonly #offset: number;
  #size: number | undefined;
  readonly #fixed: boolean;
  /**
   * Set on a probed image: returns true when `sector0` would be probed as another format; such writes
   * to the first 512 bytes fail with `EPERM` (QEMU's block-0 restriction).
   */
  probedGuard: ((sector0: Uint8Array) => boolean) | undefined;

  /** @internal Use {@link rawDriver}.open. */
  constructor(file: Edge, offset: number, size: number | undefined) {
    super({ requestAlignment: 1, maxTransfer: 0 });
    this.#file = file;
    this.#offset = offset;
    this.#size = size;
    this.#fixed = size !== undefined;
  }

  /** The window start in the file. */
  get offset(): number {
    return this.#offset;
  }

  protected override supportsFua(): boolean {
    return true;
  }

  #len(): number {
    return this.#size ?? Math.max(0, this.#file.length - this.#offset);
  }

  protected override async _read(offset: number, buf: Uint8Array): Promise<void> {
    await this.#file.readInto(offset + this.#offset, buf);
  }

  async #guard(offset: number, data: Uint8Array): Promise<void> {
    const g = this.probedGuard;
    if (g === undefined || offset >= SECTOR || data.length === 0) return;
    const sector = new Uint8Array(SECTOR);
    await this.#file.readInto(
      this.#offset,
      sector.subarray(0, Math.min(SECTOR, this.#file.length - this.#offset)),
    );
    sector.set(data.subarray(0, SECTOR - offset), offset);
    if (g(sector)) throw new BlkError("EPERM", "Operation not permitted", { offset });
  }

  protected override async _write(offset: number, data: Uint8Array, flags: WriteFlags): Promise<void> {
    await this.#guard(offset, data);
    await this.#file.write(offset + this.#offset, data, { fua: flags.fua ?? false });
  }

  protected override async _writeZeroes(offset: number, bytes: number, flags: ZeroFlags): Promise<void> {
    await this.#file.writeZeroes(offset + this.#offset, bytes, {
      mayUnmap: flags.mayUnmap ?? false,
      noFallback: flags.noFallback ?? false,
      fua: flags.fua ?? false,
    });
  }

  protected override async _discard(offset: number, bytes: number): Promise<void> {
    await this.#file.discard(offset + this.#offset, bytes);
  }

  protected override async _flush(_flags: FlushFlags): Promise<void> {
    await this.#file.flush();
  }

  protected override async _blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    const base = this.#offset;
    const fileLen = this.#file.length;
    const start = offset + base;
    if (start >= fileLen) {
      return [{ offset, length: bytes, data: false, zero: true, allocated: true }];
    }
    const got = await this.#file.blockStatus(start, Math.min(bytes, fileLen - start));
    return got.map((e) => {
      const ext: BlockStatusExtent = {
        offset: e.offset - base,
        length: e.length,
        data: e.data,
        zero: e.zero,
        allocated: true,
        hostOffset: e.hostOffset ?? e.offset,
      };
      return ext;
    });
  }

  protected override async _getLength(): Promise<number> {
    return roundUp(this.#len());
  }

  protected override async _truncate(length: number, flags: TruncateFlags): Promise<void> {
    if (this.#fixed) throw new BlkError("ENOTSUP", "Cannot resize fixed-size raw disks");
    if (Number.MAX_SAFE_INTEGER - length < this.#offset) {
      throw new BlkError("EINVAL", "Disk size too large for the chosen offset");
    }
    await this.#file.truncate(length + this.#offset, flags);
    if (this.#offset !== 0) this.#size = undefined;
  }

  protected override async _info(): Promise<BlockDriverInfo> {
    // QEMU: a raw image starts out zero exactly when its file does.
    // It asks its protocol for everything else too, so a protocol without information leaves raw without.
    const { zeroInit, unsupported } = await this.#file.child.info();
    if (unsupported === true) return { unsupported };
    return zeroInit === undefined ? {} : { zeroInit };
  }
}

/** Validates `raw` blockdev options (without `file`) with QEMU's wording. */
export const rawSchema: { parse(value: unknown): RawOptions } = {
  parse(value: unknown): RawOptions {
    const o = expectObject(value ?? {});
    const out: RawOptions = {};
    const offset = expectInt(o, "offset");
    if (offset !== undefined) {
      if (offset < 0)
        throw new BlkError("EINVAL", "Parameter 'offset' expects a non-negative number below 2^64");
      out.offset = offset;
    }
    const size = expectInt(o, "size");
    if (size !== undefined) {
      if (size < 0) throw new BlkError("EINVAL", "Parameter 'size' expects a non-negative number below 2^64");
      out.size = size;
    }
    rejectUnexpected(o, ["offset", "size"]);
    return out;
  },
};

/**
 * Checks `offset`/`size` against the file's real size with QEMU's messages and returns the window.
 * @throws {BlkError} EINVAL
 */
export function checkRawWindow(
  options: RawOptions,
  realSize: number,
): { offset: number; size: number | undefined } {
  const offset = options.offset ?? 0;
  const size = options.size;
  if (offset > realSize) {
    throw new BlkError(
      "EINVAL",
      `Offset (${offset}) cannot be greater than size of the containing file (${realSize})`,
    );
  }
  if (size !== undefined && realSize - offset < size) {
    throw new BlkError(
      "EINVAL",
      `The sum of offset (${offset}) and size (${size}) has to be smaller or equal to the  actual size of the containing file (${realSize})`,
    );
  }
  if (size !== undefined && size % SECTOR !== 0) {
    throw new BlkError("EINVAL", `Specified size is not multiple of ${SECTOR}`);
  }
  return { offset, size };
}

/**
 * The `raw` format driver. Its `file` child is the graph child named `file`; open it with
 * `children: { file: { node, role: rawChildRole(options) } }` to get QEMU's permissions.
 */
export const rawDriver: BlockDriver<RawOptions> = {
  format: "raw",
  kind: "format",
  schema: rawSchema,
  // Static, so QEMU's common case (no window: a filtered child); openImage passes rawChildRole(options).
  childOptions: [{ name: "file", role: CHILD_ROLE.FILTERED | CHILD_ROLE.PRIMARY }],
  async open(options: RawOptions, ctx: OpenContext): Promise<RawState> {
    const file = ctx.children.get("file");
    if (file === undefined) throw new BlkError("EINVAL", "Parameter 'file' is missing");
    const { offset, size } = checkRawWindow(options, file.length);
    return new RawState(file, offset, size);
  },
  probe(): number {
    // Raw matches anything, with the lowest score: it is what probing falls back to.
    return 1;
  },
  childPerm(role: number, perm: number, shared: number, writable: boolean): { perm: number; shared: number } {
    // QEMU's raw: the default permissions of its role, but write/resize only when its parents want them.
    const r = (role & CHILD_ROLE.FILTERED) !== 0 ? role : role & ~CHILD_ROLE.METADATA;
    const d = defaultChildPerm(r, perm, shared, writable);
    const wr = PERM.WRITE | PERM.RESIZE;
    return { perm: (d.perm & ~wr) | (perm & wr), shared: d.shared };
  },
};
