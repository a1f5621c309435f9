/**
 * The `null-co` protocol driver: a device of a given size that drops writes and, with `read-zeroes`,
 * reads zeroes (otherwise reads leave the buffer as it is, as QEMU leaves it uninitialised). Optional
 * per-request latency. For benchmarks and tests.
 */
import {
  type BlockDriver,
  BlockDriverBase,
  type BlockDriverInfo,
  type BlockStatusExtent,
  type OpenContext,
} from "@blk/core";
import { expectBool, expectInt, expectObject, rejectUnexpected } from "../registry/options.ts";

/** `BlockdevOptionsNull` (QEMU's names). */
export interface NullOptions {
  /** Size in bytes (default 1 GiB). */
  size?: number;
  /** Delay of every request in nanoseconds (default 0). */
  "latency-ns"?: number;
  /** Reads return zeroes (default false: the buffer is left untouched). */
  "read-zeroes"?: boolean;
}

/** QEMU's default `null-co` size: 1 GiB. */
export const NULL_DEFAULT_SIZE: number = 1 << 30;

const sleepNs = (ns: number): Promise<void> => new Promise((r) => setTimeout(r, ns / 1e6));

/** The open state of a `null-co` node. */
export class NullState extends BlockDriverBase {
  readonly size: number;
  readonly latencyNs: number;
  readonly readZeroes: boolean;

  /** @internal Use {@link nullDriver}.open. */
  constructor(options: NullOptions) {
    super();
    this.size = options.size ?? NULL_DEFAULT_SIZE;
    this.latencyNs = options["latency-ns"] ?? 0;
    this.readZeroes = options["read-zeroes"] ?? false;
  }

  async #delay(): Promise<void> {
    if (this.latencyNs > 0) await sleepNs(this.latencyNs);
  }

  protected override async _read(_offset: number, buf: Uint8Array): Promise<void> {
    await this.#delay();
    if (this.readZeroes) buf.fill(0);
  }

  protected override async _write(): Promise<void> {
    await this.#delay();
  }

  protected override async _flush(): Promise<void> {
    await this.#delay();
  }

  protected override async _blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    // QEMU: zero (and so allocated) with read-zeroes, otherwise neither data nor zero.
    const z = this.readZeroes;
    return [{ offset, length: bytes, data: false, zero: z, allocated: z, hostOffset: offset }];
  }

  protected override async _getLength(): Promise<number> {
    return this.size;
  }

  protected override async _info(): Promise<BlockDriverInfo> {
    // QEMU's null-co and null-aio have no get_info.
    return { unsupported: true };
  }

  /** Bytes allocated on the host (`actual-size`): none, as QEMU's null drivers report. */
  async allocatedSize(): Promise<number> {
    return 0;
  }
}

/** Validates `null-co` options with QEMU's wording. */
export const nullSchema: { parse(value: unknown): NullOptions } = {
  parse(value: unknown): NullOptions {
    const o = expectObject(value ?? {});
    const out: NullOptions = {};
    const size = expectInt(o, "size", 0);
    if (size !== undefined) out.size = size;
    const lat = expectInt(o, "latency-ns", 0);
    if (lat !== undefined) out["latency-ns"] = lat;
    const rz = expectBool(o, "read-zeroes");
    if (rz !== undefined) out["read-zeroes"] = rz;
    rejectUnexpected(o, ["size", "latency-ns", "read-zeroes"]);
    return out;
  },
};

/** The `null-co` protocol driver. */
export const nullDriver: BlockDriver<NullOptions> = {
  format: "null-co",
  kind: "protocol",
  schema: nullSchema,
  async open(options: NullOptions, _ctx: OpenContext): Promise<NullState> {
    return new NullState(nullSchema.parse(options));
  },
};

/** The `null-aio` protocol driver: QEMU's second null driver, with the same options and behaviour. */
export const nullAioDriver: BlockDriver<NullOptions> = { ...nullDriver, format: "null-aio" };
