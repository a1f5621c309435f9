/**
 * NBD server and block export options (QEMU 7.2 `qapi/block-export.json`, as introspected from
 * qemu-storage-daemon 7.2.22): `--nbd-server` / `nbd-server-start` and `--export` / `block-export-add`.
 */
import { q } from "../dsl.ts";
import type {
  EnumType,
  InferUnion,
  InferUnionInput,
  ObjectType,
  QapiType,
  UnionType,
  WithDefaults,
} from "../types.ts";
import { type BlockDirtyBitmap, BlockDirtyBitmap as BlockDirtyBitmapSchema } from "./block.ts";
import { SocketAddress, SocketAddressLegacy } from "./socket.ts";

/** `BlockDirtyBitmapOrStr`: a bitmap of the exported node by name, or `{node, name}`. */
export type BlockDirtyBitmapOrStr = string | BlockDirtyBitmap;
/** `BlockDirtyBitmapOrStr` schema. */
export const BlockDirtyBitmapOrStr: QapiType<BlockDirtyBitmapOrStr> = q.alternate("BlockDirtyBitmapOrStr", {
  local: q.str(),
  external: BlockDirtyBitmapSchema,
});

/** `NbdServerOptions`: `--nbd-server` (flat address). `max-connections` 0 = unlimited. */
export interface NbdServerOptions {
  addr: SocketAddress;
  "tls-creds"?: string;
  "tls-authz"?: string;
  "max-connections": number;
}
/** Input side of {@link NbdServerOptions}. */
export type NbdServerOptionsInput = WithDefaults<NbdServerOptions, "max-connections">;
/** `NbdServerOptions` schema (`--nbd-server addr.type=unix,addr.path=…`; no implied key). */
export const NbdServerOptions: ObjectType<NbdServerOptions, NbdServerOptionsInput> = q.object(
  {
    addr: SocketAddress,
    "tls-creds": q.optional(q.str()),
    "tls-authz": q.optional(q.str()),
    "max-connections": q.optional(q.uint32(), 0),
  },
  { name: "NbdServerOptions" },
);

/** Arguments of `nbd-server-start` (legacy address with the `data` wrapper). */
export interface NbdServerStartArguments {
  addr: SocketAddressLegacy;
  "tls-creds"?: string;
  "tls-authz"?: string;
  "max-connections": number;
}
/** Input side of {@link NbdServerStartArguments}. */
export type NbdServerStartArgumentsInput = WithDefaults<NbdServerStartArguments, "max-connections">;
/** Schema of `nbd-server-start`'s arguments. */
export const NbdServerStartArguments: ObjectType<NbdServerStartArguments, NbdServerStartArgumentsInput> =
  q.object(
    {
      addr: SocketAddressLegacy,
      "tls-creds": q.optional(q.str()),
      "tls-authz": q.optional(q.str()),
      "max-connections": q.optional(q.uint32(), 0),
    },
    { name: "q_obj_nbd-server-start-arg" },
  );

/** `BlockExportType`. */
export type BlockExportType = "nbd" | "vhost-user-blk" | "fuse" | "vduse-blk";
/** `BlockExportType` schema. */
export const BlockExportType: EnumType<BlockExportType> = q.enum(
  ["nbd", "vhost-user-blk", "fuse", "vduse-blk"],
  {
    name: "BlockExportType",
  },
);

/** The members every export has. */
export interface BlockExportOptionsBase {
  type: BlockExportType;
  id: string;
  "fixed-iothread": boolean;
  iothread?: string;
  "node-name": string;
  writable: boolean;
  writethrough: boolean;
}
/** Input side of {@link BlockExportOptionsBase}. */
export type BlockExportOptionsBaseInput = WithDefaults<
  BlockExportOptionsBase,
  "fixed-iothread" | "writable" | "writethrough"
>;
/** Schema of the common export members. */
export const BlockExportOptionsBase: ObjectType<BlockExportOptionsBase, BlockExportOptionsBaseInput> =
  q.object({
    type: BlockExportType,
    id: q.str(),
    "fixed-iothread": q.optional(q.bool(), false),
    iothread: q.optional(q.str()),
    "node-name": q.str(),
    writable: q.optional(q.bool(), false),
    writethrough: q.optional(q.bool(), false),
  });

/** `BlockExportOptionsNbd`: `name` defaults to the node name (applied by the export code, not here). */
export interface BlockExportOptionsNbd {
  name?: string;
  description?: string;
  bitmaps?: BlockDirtyBitmapOrStr[];
  "allocation-depth": boolean;
}
/** Input side of {@link BlockExportOptionsNbd}. */
export type BlockExportOptionsNbdInput = WithDefaults<BlockExportOptionsNbd, "allocation-depth">;
/** `BlockExportOptionsNbd` schema. */
export const BlockExportOptionsNbd: ObjectType<BlockExportOptionsNbd, BlockExportOptionsNbdInput> = q.object(
  {
    name: q.optional(q.str()),
    description: q.optional(q.str()),
    bitmaps: q.optional(q.list(BlockDirtyBitmapOrStr)),
    "allocation-depth": q.optional(q.bool(), false),
  },
  { name: "BlockExportOptionsNbd" },
);

/** `BlockExportOptionsVhostUserBlk`. */
export interface BlockExportOptionsVhostUserBlk {
  addr: SocketAddress;
  "logical-block-size"?: number;
  "num-queues"?: number;
}
/** `BlockExportOptionsVhostUserBlk` schema. */
export const BlockExportOptionsVhostUserBlk: ObjectType<BlockExportOptionsVhostUserBlk> = q.object(
  { addr: SocketAddress, "logical-block-size": q.optional(q.size()), "num-queues": q.optional(q.uint16()) },
  { name: "BlockExportOptionsVhostUserBlk" },
);

/** `BlockExportOptionsFuse`. */
export interface BlockExportOptionsFuse {
  mountpoint: string;
  growable?: boolean;
  "allow-other"?: "off" | "on" | "auto";
}
/** `BlockExportOptionsFuse` schema. */
export const BlockExportOptionsFuse: ObjectType<BlockExportOptionsFuse> = q.object(
  {
    mountpoint: q.str(),
    growable: q.optional(q.bool()),
    "allow-other": q.optional(q.enum(["off", "on", "auto"], { name: "FuseExportAllowOther" })),
  },
  { name: "BlockExportOptionsFuse" },
);

/** `BlockExportOptionsVduseBlk`. */
export interface BlockExportOptionsVduseBlk {
  name: string;
  "num-queues"?: number;
  "queue-size"?: number;
  "logical-block-size"?: number;
  serial?: string;
}
/** `BlockExportOptionsVduseBlk` schema. */
export const BlockExportOptionsVduseBlk: ObjectType<BlockExportOptionsVduseBlk> = q.object(
  {
    name: q.str(),
    "num-queues": q.optional(q.uint16()),
    "queue-size": q.optional(q.uint16()),
    "logical-block-size": q.optional(q.size()),
    serial: q.optional(q.str()),
  },
  { name: "BlockExportOptionsVduseBlk" },
);

/** The variants of {@link BlockExportOptions}, by type. */
export type BlockExportVariants = {
  nbd: ObjectType<BlockExportOptionsNbd, BlockExportOptionsNbdInput>;
  "vhost-user-blk": ObjectType<BlockExportOptionsVhostUserBlk>;
  fuse: ObjectType<BlockExportOptionsFuse>;
  "vduse-blk": ObjectType<BlockExportOptionsVduseBlk>;
};

/** `BlockExportOptions`: `block-export-add`'s arguments and `--export`'s value. */
export type BlockExportOptions = InferUnion<BlockExportOptionsBase, "type", BlockExportVariants>;
/** What library callers may pass as {@link BlockExportOptions}. */
export type BlockExportOptionsInput = InferUnionInput<
  BlockExportOptionsBaseInput,
  "type",
  BlockExportVariants
>;
/**
 * `BlockExportOptions` schema (`--export` has the implied key `type`).
 * @example parseOptionArgument(BlockExportOptions, "nbd,id=e0,node-name=disk,writable=on", { impliedKey: "type" })
 */
export const BlockExportOptions: UnionType<
  BlockExportOptionsBase,
  "type",
  BlockExportVariants,
  BlockExportOptionsBaseInput
> = q.union({
  name: "BlockExportOptions",
  base: BlockExportOptionsBase,
  discriminator: "type",
  variants: {
    nbd: BlockExportOptionsNbd,
    "vhost-user-blk": BlockExportOptionsVhostUserBlk,
    fuse: BlockExportOptionsFuse,
    "vduse-blk": BlockExportOptionsVduseBlk,
  },
});
