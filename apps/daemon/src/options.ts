/**
 * qemu-storage-daemon's option arguments (`--blockdev`, `--object`, `--nbd-server`, `--export`,
 * `--chardev`, `--monitor`), parsed with the QAPI toolkit (keyval or JSON) and applied through the same
 * handlers as the QMP commands `blockdev-add`, `object-add`, `nbd-server-start`, `block-export-add`.
 */
import {
  BlockExportOptions,
  NbdServerOptions,
  parseKeyvalWithHelp,
  parseOptionArgument,
  QSD_IMPLIED_KEYS,
} from "@blk/qmp";
import type { DaemonState } from "./context.ts";
import { generic } from "./errors.ts";

/** The options that take an argument and change the daemon. */
export type OptionName = "blockdev" | "object" | "nbd-server" | "export" | "chardev" | "monitor";

/** The daemon as the option handlers need it. */
export interface OptionTarget extends DaemonState {
  readonly chardevs: Map<string, { path: string } | { host: string; port: number }>;
  readonly qmp: { listen(o: { path: string } | { port: number; host?: string }): Promise<unknown> };
}

/** Thrown (and caught by `main`) when an option asked for help: print `text`, exit 0. */
export class OptionHelp extends Error {
  override readonly name = "OptionHelp";
  readonly text: string;
  constructor(text: string) {
    super("help requested");
    this.text = text;
  }
}

const usedChardevs = new WeakMap<object, Set<string>>();

/** QemuOpts-style `backend,key=value,flag`: a bare key means `on`, `,,` is a comma. */
function parseQemuOpts(arg: string, impliedKey: string): Record<string, string> {
  const out: Record<string, string> = {};
  const parts: string[] = [];
  let cur = "";
  for (let i = 0; i < arg.length; i++) {
    const c = arg[i];
    if (c === "," && arg[i + 1] === ",") {
      cur += ",";
      i++;
    } else if (c === ",") {
      parts.push(cur);
      cur = "";
    } else cur += c;
  }
  parts.push(cur);
  parts.forEach((p, i) => {
    const eq = p.indexOf("=");
    if (eq < 0) {
      if (i === 0) out[impliedKey] = p;
      else if (p !== "") out[p] = "on";
    } else out[p.slice(0, eq)] = p.slice(eq + 1);
  });
  return out;
}

function onOff(name: string, v: string | undefined, dflt: boolean): boolean {
  if (v === undefined) return dflt;
  if (v === "on" || v === "yes" || v === "true" || v === "y") return true;
  if (v === "off" || v === "no" || v === "false" || v === "n") return false;
  throw generic(`Parameter '${name}' expects 'on' or 'off'`);
}

function applyChardev(t: OptionTarget, arg: string): void {
  const o = parseQemuOpts(arg, "backend");
  const id = o.id;
  if (id === undefined) throw generic("Parameter 'id' is missing");
  if (o.backend !== "socket") throw generic(`blkd supports only socket chardevs, not '${o.backend ?? ""}'`);
  if (t.chardevs.has(id))
    throw generic(`attempt to add duplicate property '${id}' to object (type 'container')`);
  for (const k of Object.keys(o)) {
    if (!["backend", "id", "path", "host", "port", "server", "wait", "ipv4", "ipv6"].includes(k))
      throw generic(`Invalid parameter '${k}'`);
  }
  let addr: { path: string } | { host: string; port: number };
  if (o.path !== undefined) addr = { path: o.path };
  else if (o.host !== undefined || o.port !== undefined) {
    const port = Number(o.port ?? "");
    if (o.port === undefined || !/^\d+$/.test(o.port) || port > 65535)
      throw generic(`Port '${o.port ?? ""}' is not a valid port`);
    addr = { host: o.host ?? "127.0.0.1", port };
  } else throw generic("Unable to parse FD number");
  if (!onOff("server", o.server, false)) throw generic("blkd supports only listening sockets (server=on)");
  onOff("wait", o.wait, true);
  t.chardevs.set(id, addr);
}

async function applyMonitor(t: OptionTarget, arg: string): Promise<void> {
  const { value } = parseKeyvalWithHelp(arg, { impliedKey: QSD_IMPLIED_KEYS.monitor });
  for (const k of Object.keys(value)) {
    if (!["chardev", "mode", "pretty", "id"].includes(k)) throw generic(`Parameter '${k}' is unexpected`);
  }
  const chardev = value.chardev;
  if (chardev === undefined) throw generic("Parameter 'chardev' is missing");
  if (typeof chardev !== "string") throw generic("Parameters 'chardev.*' are unexpected");
  const mode = value.mode;
  if (mode !== undefined && mode !== "control" && mode !== "readline")
    throw generic(`Parameter 'mode' does not accept value '${String(mode)}'`);
  if (value.pretty !== undefined) onOff("pretty", String(value.pretty), false);
  const addr = t.chardevs.get(chardev);
  if (addr === undefined) throw generic(`chardev "${chardev}" not found`);
  if (mode === "readline") throw generic("Only QMP is supported");
  const used = usedChardevs.get(t) ?? new Set<string>();
  usedChardevs.set(t, used);
  if (used.has(chardev)) throw generic(`Chardev '${chardev}' is already in use`);
  try {
    await t.qmp.listen(addr);
  } catch (e) {
    throw generic(`Failed to bind socket: ${(e as Error).message}`, e);
  }
  used.add(chardev);
  t.log.info("monitor listening", { chardev, ...addr });
}

async function objectHelp(types: readonly string[], type: string | undefined): Promise<string> {
  if (type === undefined) return `List of user creatable objects:\n${types.map((t) => `  ${t}\n`).join("")}`;
  if (!types.includes(type)) throw generic(`invalid object type: ${type}`);
  // @blk/throttle is imported by the objects module anyway; not at startup (a command line without
  // --object does not need it).
  const { THROTTLE_GROUP_X_PROPERTIES } = await import("@blk/throttle");
  const lines = ["  limits=<ThrottleLimits>", ...THROTTLE_GROUP_X_PROPERTIES.map((p) => `  ${p}=<int>`)];
  return `${type} options:\n${lines.join("\n")}\n`;
}

async function applyObject(t: OptionTarget, arg: string): Promise<void> {
  const { OBJECT_TYPES, ObjectAddArgs, objectAdd } = await import("./commands/objects.ts");
  let value: Record<string, unknown>;
  if (arg.startsWith("{")) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(arg);
    } catch (e) {
      throw generic("JSON parse error, premature EOI", e);
    }
    if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed))
      throw generic("Invalid parameter type for 'qom-type', expected: string");
    value = parsed as Record<string, unknown>;
  } else {
    const r = parseKeyvalWithHelp(arg, { impliedKey: QSD_IMPLIED_KEYS.object });
    const type = r.value["qom-type"];
    if (r.help)
      throw new OptionHelp(await objectHelp(OBJECT_TYPES, typeof type === "string" ? type : undefined));
    value = r.value;
  }
  objectAdd(t, ObjectAddArgs.parse(value));
}

/**
 * Applies one option. The command module behind it is imported here, so that a command line loads only
 * the modules its options use.
 * @throws {QmpError} with QEMU's message; {@link OptionHelp} for `--object help`
 */
export async function applyOption(t: OptionTarget, option: OptionName, arg: string): Promise<void> {
  switch (option) {
    case "blockdev": {
      const { BlockdevAddArgs, blockdevAdd } = await import("./commands/nodes.ts");
      const options = parseOptionArgument(BlockdevAddArgs, arg, { impliedKey: QSD_IMPLIED_KEYS.blockdev });
      await t.drivers.loadFor(options);
      await blockdevAdd(t, options);
      return;
    }
    case "object":
      await applyObject(t, arg);
      return;
    case "nbd-server": {
      const { nbdServerStart } = await import("./commands/exports.ts");
      await nbdServerStart(t, parseOptionArgument(NbdServerOptions, arg) as NbdServerOptions);
      return;
    }
    case "export": {
      const { blockExportAdd } = await import("./commands/exports.ts");
      blockExportAdd(
        t,
        parseOptionArgument(BlockExportOptions, arg, {
          impliedKey: QSD_IMPLIED_KEYS.export,
        }) as BlockExportOptions,
      );
      return;
    }
    case "chardev":
      applyChardev(t, arg);
      return;
    case "monitor":
      await applyMonitor(t, arg);
      return;
  }
}
