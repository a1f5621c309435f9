/**
 * Socket addresses (QEMU's `qapi/sockets.json`, 7.2): the flat `SocketAddress` used by `blockdev-add` nbd
 * (`server`), `--nbd-server addr.*` and vhost-user exports, and the legacy `SocketAddressLegacy` with its `data`
 * wrapper used by `nbd-server-start`.
 */
import { q } from "../dsl.ts";
import type { EnumType, ObjectType, QapiType } from "../types.ts";

/** `SocketAddressType`. */
export type SocketAddressType = "inet" | "unix" | "vsock" | "fd";
/** `SocketAddressType` schema. */
export const SocketAddressType: EnumType<SocketAddressType> = q.enum(["inet", "unix", "vsock", "fd"], {
  name: "SocketAddressType",
});

/** `InetSocketAddress`: a host and a port, both strings (`"port": "10809"`). */
export interface InetSocketAddress {
  host: string;
  port: string;
  numeric?: boolean;
  to?: number;
  ipv4?: boolean;
  ipv6?: boolean;
  "keep-alive"?: boolean;
  mptcp?: boolean;
}
/** `InetSocketAddress` schema. */
export const InetSocketAddress: ObjectType<InetSocketAddress> = q.object(
  {
    host: q.str(),
    port: q.str(),
    numeric: q.optional(q.bool()),
    to: q.optional(q.uint16()),
    ipv4: q.optional(q.bool()),
    ipv6: q.optional(q.bool()),
    "keep-alive": q.optional(q.bool()),
    mptcp: q.optional(q.bool()),
  },
  { name: "InetSocketAddress" },
);

/** `UnixSocketAddress`. */
export interface UnixSocketAddress {
  path: string;
  abstract?: boolean;
  tight?: boolean;
}
/** `UnixSocketAddress` schema. */
export const UnixSocketAddress: ObjectType<UnixSocketAddress> = q.object(
  { path: q.str(), abstract: q.optional(q.bool()), tight: q.optional(q.bool()) },
  { name: "UnixSocketAddress" },
);

/** `VsockSocketAddress`. */
export interface VsockSocketAddress {
  cid: string;
  port: string;
}
/** `VsockSocketAddress` schema. */
export const VsockSocketAddress: ObjectType<VsockSocketAddress> = q.object(
  { cid: q.str(), port: q.str() },
  { name: "VsockSocketAddress" },
);

/** `FdSocketAddress` (QEMU calls it `String`): a file descriptor name or number. */
export interface FdSocketAddress {
  str: string;
}
/** `FdSocketAddress` schema. */
export const FdSocketAddress: ObjectType<FdSocketAddress> = q.object({ str: q.str() }, { name: "String" });

/** The flat `SocketAddress`: `{"type": "unix", "path": …}`, `{"type": "inet", "host": …, "port": "10809"}`. */
export type SocketAddress =
  | ({ type: "inet" } & InetSocketAddress)
  | ({ type: "unix" } & UnixSocketAddress)
  | ({ type: "vsock" } & VsockSocketAddress)
  | ({ type: "fd" } & FdSocketAddress);
/** `SocketAddress` schema (flat union on `type`). */
export const SocketAddress: QapiType<SocketAddress> = q.union({
  name: "SocketAddress",
  base: q.object({ type: SocketAddressType }),
  discriminator: "type",
  variants: {
    inet: InetSocketAddress,
    unix: UnixSocketAddress,
    vsock: VsockSocketAddress,
    fd: FdSocketAddress,
  },
});

/** The legacy `SocketAddressLegacy`: `{"type": "unix", "data": {"path": …}}` (note the `data` wrapper). */
export type SocketAddressLegacy =
  | { type: "inet"; data: InetSocketAddress }
  | { type: "unix"; data: UnixSocketAddress }
  | { type: "vsock"; data: VsockSocketAddress }
  | { type: "fd"; data: FdSocketAddress };
/** `SocketAddressLegacy` schema (what `nbd-server-start` takes as `addr`). */
export const SocketAddressLegacy: QapiType<SocketAddressLegacy> = q.union({
  name: "SocketAddressLegacy",
  base: q.object({ type: SocketAddressType }),
  discriminator: "type",
  variants: {
    inet: q.object({ data: InetSocketAddress }, { name: "InetSocketAddressWrapper" }),
    unix: q.object({ data: UnixSocketAddress }, { name: "UnixSocketAddressWrapper" }),
    vsock: q.object({ data: VsockSocketAddress }, { name: "VsockSocketAddressWrapper" }),
    fd: q.object({ data: FdSocketAddress }, { name: "StringWrapper" }),
  },
});
