/**
 * NBD server and block exports: `nbd-server-start`, `nbd-server-stop`, `block-export-add`,
 * `block-export-del`, `query-block-exports`, with `BLOCK_EXPORT_DELETED` (spec/qmp.md §3.7), over
 * `@blk/drivers/nbd`'s NbdServer.
 */
import { PERM, PERM_ALL } from "@blk/core";
import { type NbdListenAddress, NbdServer } from "@blk/drivers/nbd";
import {
  BlockExportOptions,
  type CommandDefinition,
  defineCommand,
  NbdServerStartArguments,
  q,
  type SocketAddress,
} from "@blk/qmp";
import type { DaemonState, ExportEntry } from "../context.ts";
import { generic, qmpErrors } from "../errors.ts";
import { lookupNode } from "./lookup.ts";

/** What `--nbd-server` and `nbd-server-start` both come down to (flat address). */
export interface NbdServerConfig {
  addr: SocketAddress;
  "tls-creds"?: string;
  "tls-authz"?: string;
  "max-connections": number;
}

function listenAddress(addr: SocketAddress): NbdListenAddress {
  if (addr.type === "unix") return { type: "unix", path: addr.path };
  if (addr.type === "inet") {
    const port = Number(addr.port);
    if (!/^\d+$/.test(addr.port) || port > 65535) throw generic(`Port '${addr.port}' is not a valid port`);
    return { type: "inet", host: addr.host, port };
  }
  throw generic(`blkd does not support '${addr.type}' socket addresses`);
}

/** Starts the NBD server (`nbd-server-start`, `--nbd-server`). */
export async function nbdServerStart(state: DaemonState, config: NbdServerConfig): Promise<void> {
  if (state.nbd !== undefined) throw generic("NBD server already running");
  const tlsId = config["tls-creds"];
  // The objects module (TLS, throttle groups) is imported only when credentials are named.
  const creds =
    tlsId === undefined ? undefined : (await import("./objects.ts")).tlsCredsObjects(state).get(tlsId)?.creds;
  if (tlsId !== undefined && creds === undefined) throw generic(`No TLS credentials with id '${tlsId}'`);
  if (creds !== undefined && creds.endpoint !== "server")
    throw generic("Expected TLS credentials for a server endpoint");
  // QEMU 7.2 ignores `tls-authz` without `tls-creds`; blkd has no authz objects to check clients with.
  if (creds !== undefined && config["tls-authz"] !== undefined)
    throw generic("blkd does not support 'tls-authz'");
  const address = listenAddress(config.addr);
  const server = new NbdServer({
    maxConnections: config["max-connections"],
    log: (message) => state.log.warn(message, { component: "nbd" }),
    ...(creds === undefined ? {} : { tls: { creds } }),
  });
  state.nbd = server;
  try {
    await qmpErrors(() => server.listen(address));
  } catch (e) {
    state.nbd = undefined;
    await server.close();
    throw e;
  }
  state.log.info("nbd server started", { addr: config.addr });
}

/** Removes an export and emits `BLOCK_EXPORT_DELETED` once it is gone. */
export async function exportDel(
  state: DaemonState,
  entry: ExportEntry,
  mode: "safe" | "hard",
): Promise<void> {
  const nbd = state.nbd;
  entry.shuttingDown = true;
  try {
    if (nbd !== undefined && !entry.nbd.removed) await nbd.removeExport(entry.name, { mode });
  } catch (e) {
    entry.shuttingDown = false;
    throw e;
  }
  state.exports.delete(entry.id);
  state.emit("BLOCK_EXPORT_DELETED", { id: entry.id });
  state.log.info("export deleted", { id: entry.id });
}

/** Stops the NBD server, deleting its exports first (`nbd-server-stop`, shutdown). */
export async function nbdServerStop(state: DaemonState): Promise<void> {
  const server = state.nbd;
  if (server === undefined) throw generic("NBD server not running");
  for (const entry of [...state.exports.values()]) await exportDel(state, entry, "hard");
  state.nbd = undefined;
  await server.close();
  state.log.info("nbd server stopped");
}

/** Adds an export (`block-export-add`, `--export`). */
export function blockExportAdd(state: DaemonState, args: BlockExportOptions): ExportEntry {
  if (state.exports.has(args.id)) throw generic(`Block export id '${args.id}' is already in use`);
  const node = lookupNode(state, undefined, args["node-name"]);
  if (args.type !== "nbd") throw generic(`blkd does not support '${args.type}' exports`);
  if (args.iothread !== undefined) throw generic("blkd does not support iothreads");
  // QEMU checks this for every export type, before the NBD server's own checks (name, description).
  if (args.writable === true && node.readOnly) throw generic("Cannot export read-only node as writable");
  const nbd = state.nbd;
  if (nbd === undefined) throw generic("NBD server not running");
  const name = args.name ?? args["node-name"];
  if (args.description !== undefined && Buffer.byteLength(args.description) > 4096)
    throw generic("description '…' too long");
  // Names are looked up down the node's chain, `{node, name}` on any node (NbdExport, QEMU's rules).
  const bitmaps = args.bitmaps ?? [];
  const exp = (() => {
    try {
      return nbd.addExport({
        name,
        node,
        writable: args.writable,
        bitmaps,
        allocationDepth: args["allocation-depth"],
        ...(args.description === undefined ? {} : { description: args.description }),
      });
    } catch (e) {
      throw generic((e as Error).message, e);
    }
  })();
  try {
    // QEMU's export BlockBackend shares everything but resize (the export's size is fixed).
    exp.edge.setPerm(exp.edge.perm, PERM_ALL & ~PERM.RESIZE);
  } catch (e) {
    void nbd.removeExport(name, { mode: "hard" }).catch(() => {});
    throw generic((e as Error).message, e);
  }
  const entry: ExportEntry = {
    id: args.id,
    type: "nbd",
    nodeName: args["node-name"],
    name,
    nbd: exp,
    shuttingDown: false,
  };
  state.exports.set(args.id, entry);
  state.log.info("export added", { id: args.id, "node-name": args["node-name"], name });
  return entry;
}

const DelArgs = q.object({
  id: q.str(),
  mode: q.optional(q.enum(["safe", "hard"], { name: "BlockExportRemoveMode" }), "safe"),
});

/** The NBD/export commands. */
export function exportCommands(state: DaemonState): CommandDefinition<never, unknown>[] {
  return [
    defineCommand({
      name: "nbd-server-start",
      args: NbdServerStartArguments,
      handler: async (args) => {
        const addr = { type: args.addr.type, ...args.addr.data } as SocketAddress;
        const config: NbdServerConfig = { addr, "max-connections": args["max-connections"] };
        if (args["tls-creds"] !== undefined) config["tls-creds"] = args["tls-creds"];
        if (args["tls-authz"] !== undefined) config["tls-authz"] = args["tls-authz"];
        await nbdServerStart(state, config);
        return {};
      },
    }),
    defineCommand({
      name: "nbd-server-stop",
      handler: async () => {
        await nbdServerStop(state);
        return {};
      },
    }),
    defineCommand({
      name: "block-export-add",
      args: BlockExportOptions,
      handler: (args) => {
        blockExportAdd(state, args);
        return {};
      },
    }),
    defineCommand({
      name: "block-export-del",
      args: DelArgs,
      handler: async (args) => {
        const entry = state.exports.get(args.id);
        if (entry === undefined) throw generic(`Export '${args.id}' is not found`);
        if (entry.shuttingDown) throw generic(`Export '${args.id}' is already shutting down`);
        await qmpErrors(() => exportDel(state, entry, args.mode));
        return {};
      },
    }),
    defineCommand({
      name: "query-block-exports",
      // Newest first, as qemu-storage-daemon lists them.
      handler: () =>
        [...state.exports.values()].reverse().map((e) => ({
          id: e.id,
          type: e.type,
          // The node the export serves now (a completed mirror moves the export's edge to its target).
          "node-name": e.nbd.edge.child.nodeName,
          "shutting-down": e.shuttingDown,
        })),
    }),
  ] as unknown as CommandDefinition<never, unknown>[];
}
