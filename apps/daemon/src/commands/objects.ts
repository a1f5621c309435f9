/**
 * QOM objects: `object-add`, `object-del`, `qom-get`, `qom-set`, `qom-list` for `throttle-group`
 * objects (spec/qmp.md §3.8, spec/throttle.md §4.4), over `@blk/throttle`'s ThrottleGroupProperties,
 * and for `tls-creds-psk` / `tls-creds-x509` objects (QEMU's file layout, `@blk/drivers/nbd`'s
 * TlsCreds), which `nbd-server-start`'s `tls-creds` names.
 *
 * TLS credentials live beside `state.objects` (whose type holds throttle groups only) in a per-daemon
 * map, {@link tlsCredsObjects}; ids are unique across both. As in QEMU 7.2, `object-del` of credentials
 * succeeds even while a running NBD server uses them (the server keeps its own reference), and
 * `qom-set` after creation is accepted and only changes what `qom-get` reports (files are read once).
 */
import { TlsCreds } from "@blk/drivers/nbd";
import { type ArgsSchema, type CommandDefinition, defineCommand, QmpError, q } from "@blk/qmp";
import { ThrottleGroup, ThrottleGroupProperties } from "@blk/throttle";
import type { DaemonObject, DaemonState } from "../context.ts";
import { generic, qmpErrors } from "../errors.ts";

/** The object types blkd can create (QEMU's `ObjectType` enum has many more). */
export const OBJECT_TYPES: readonly string[] = ["throttle-group", "tls-creds-psk", "tls-creds-x509"];

type ObjectType = "throttle-group" | "tls-creds-psk" | "tls-creds-x509";

/** `object-add` arguments: `qom-type`, `id` and the type's properties (kept as given, in order). */
export interface ObjectAddArgs {
  "qom-type": ObjectType;
  id: string;
  props: Record<string, unknown>;
}

/** A `tls-creds-psk` / `tls-creds-x509` object: its QOM properties and the loaded credentials. */
export interface TlsCredsObject {
  readonly id: string;
  readonly type: "tls-creds-psk" | "tls-creds-x509";
  /** QOM property values as `qom-get` reports them. */
  readonly props: Record<string, string | boolean>;
  readonly creds: TlsCreds;
}

const tlsObjects = new WeakMap<DaemonState, Map<string, TlsCredsObject>>();

/** The daemon's TLS credentials objects by id (created on first use). */
export function tlsCredsObjects(state: DaemonState): Map<string, TlsCredsObject> {
  let m = tlsObjects.get(state);
  if (m === undefined) {
    m = new Map();
    tlsObjects.set(state, m);
  }
  return m;
}

/**
 * The daemon's credentials by id, for `makeNbdDriver({ tlsCreds })`: the `nbd` driver's `tls-creds`
 * then names `tls-creds-*` objects.
 */
export function tlsCredsLookup(state: DaemonState): { get(id: string): TlsCreds | undefined } {
  return { get: (id) => tlsCredsObjects(state).get(id)?.creds };
}

/**
 * QOM properties of a throttle group, in QEMU 7.2's `qom-list` order (that of its property table; after
 * `type`): `limits` and the 19 `x-` integers.
 */
const THROTTLE_GROUP_PROPS: readonly string[] = [
  "x-bps-write-max-length",
  "x-iops-total-max-length",
  "x-iops-size",
  "limits",
  "x-bps-total",
  "x-iops-read-max-length",
  "x-bps-write",
  "x-iops-write-max-length",
  "x-bps-read-max",
  "x-iops-read-max",
  "x-bps-total-max",
  "x-bps-read-max-length",
  "x-iops-read",
  "x-bps-read",
  "x-bps-write-max",
  "x-iops-total-max",
  "x-iops-total",
  "x-iops-write",
  "x-bps-total-max-length",
  "x-iops-write-max",
];

/** QOM properties of the TLS credentials types, in QEMU 7.2's `qom-list` order (after `type`). */
const TLS_PROPS: Record<TlsCredsObject["type"], readonly (readonly [string, string])[]> = {
  "tls-creds-psk": [
    ["endpoint", "QCryptoTLSCredsEndpoint"],
    ["dir", "string"],
    ["verify-peer", "bool"],
    ["priority", "string"],
    ["username", "string"],
    ["loaded", "bool"],
  ],
  "tls-creds-x509": [
    ["endpoint", "QCryptoTLSCredsEndpoint"],
    ["dir", "string"],
    ["verify-peer", "bool"],
    ["priority", "string"],
    ["sanity-check", "bool"],
    ["passwordid", "string"],
    ["loaded", "bool"],
  ],
};

/**
 * A boolean property: JSON `true`/`false`, or (unless `strict`, as for `qom-set`) `on`/`off` and QEMU's
 * other spellings, which is what `--object` keyval strings carry (`object-add` shares that parser, so
 * it takes the strings too).
 */
function boolProp(name: string, v: unknown, strict: boolean): boolean {
  if (typeof v === "boolean") return v;
  if (!strict && typeof v === "string") {
    if (["on", "yes", "true", "y"].includes(v)) return true;
    if (["off", "no", "false", "n"].includes(v)) return false;
    throw generic(`Parameter '${name}' expects 'on' or 'off'`);
  }
  throw generic(`Invalid parameter type for '${name}', expected: boolean`);
}

function stringProp(name: string, v: unknown): string {
  if (typeof v !== "string") throw generic(`Invalid parameter type for '${name}', expected: string`);
  return v;
}

/** Checks one TLS property value; returns it as `qom-get` reports it. */
function tlsProp(type: TlsCredsObject["type"], name: string, v: unknown, strict = false): string | boolean {
  if (name === "loaded") throw generic(`Property '${type}.loaded' is not writable`);
  if (!TLS_PROPS[type].some(([n]) => n === name)) throw generic(`Parameter '${name}' is unexpected`);
  const kind = TLS_PROPS[type].find(([n]) => n === name)?.[1];
  if (kind === "bool") return boolProp(name, v, strict);
  const text = stringProp(name, v);
  if (name === "endpoint" && text !== "server" && text !== "client")
    throw generic(`Parameter 'endpoint' does not accept value '${text}'`);
  return text;
}

/** Creates a TLS credentials object (reads its files now, as QEMU's `complete`). */
function tlsObjectAdd(state: DaemonState, args: ObjectAddArgs): TlsCredsObject {
  const type = args["qom-type"] as TlsCredsObject["type"];
  const props: Record<string, string | boolean> = {
    endpoint: "client",
    dir: "",
    "verify-peer": true,
    priority: "",
    ...(type === "tls-creds-psk" ? { username: "" } : { "sanity-check": true, passwordid: "" }),
  };
  for (const [k, v] of Object.entries(args.props)) props[k] = tlsProp(type, k, v);
  const endpoint = props.endpoint as "server" | "client";
  const dir = props.dir as string;
  const username = props.username;
  const creds = (() => {
    try {
      return type === "tls-creds-psk"
        ? TlsCreds.load({
            type: "psk",
            endpoint,
            dir,
            ...(typeof username === "string" && username !== "" ? { username } : {}),
          })
        : TlsCreds.load({ type: "x509", endpoint, dir, verifyPeer: props["verify-peer"] === true });
    } catch (e) {
      throw generic((e as Error).message, e);
    }
  })();
  const tls = tlsCredsObjects(state);
  if (state.objects.has(args.id) || tls.has(args.id))
    throw generic(`attempt to add duplicate property '${args.id}' to object (type 'container')`);
  const obj: TlsCredsObject = { id: args.id, type, props: { ...props, loaded: true }, creds };
  tls.set(args.id, obj);
  state.log.info("object added", { id: args.id, "qom-type": type });
  return obj;
}

/** Validates `object-add` arguments (QMP JSON, or keyval strings from `--object`). */
export const ObjectAddArgs: ArgsSchema<ObjectAddArgs> = {
  parse(value: unknown): ObjectAddArgs {
    const o = value as Record<string, unknown>;
    const type = o["qom-type"];
    if (type === undefined) throw generic("Parameter 'qom-type' is missing");
    if (typeof type !== "string") throw generic("Invalid parameter type for 'qom-type', expected: string");
    if (!OBJECT_TYPES.includes(type)) throw generic(`Parameter 'qom-type' does not accept value '${type}'`);
    const id = o.id;
    if (id === undefined) throw generic("Parameter 'id' is missing");
    if (typeof id !== "string") throw generic("Invalid parameter type for 'id', expected: string");
    const props: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(o)) if (k !== "qom-type" && k !== "id") props[k] = v;
    return { "qom-type": type as ObjectType, id, props };
  },
};

const IdArgs = q.object({ id: q.str() });
const GetArgs = q.object({ path: q.str(), property: q.str() });
const SetArgs = q.object({ path: q.str(), property: q.str(), value: q.any() });
const ListArgs = q.object({ path: q.str() });

/** Creates an object (the one path of `object-add` and `--object`). */
export function objectAdd(state: DaemonState, args: ObjectAddArgs): DaemonObject | TlsCredsObject {
  if (args["qom-type"] !== "throttle-group") return tlsObjectAdd(state, args);
  const props = new ThrottleGroupProperties();
  // As QEMU: the properties are set and checked first, the id is added to /objects last.
  const config = (() => {
    try {
      props.setAll(args.props);
      return props.complete();
    } catch (e) {
      throw new QmpError("GenericError", (e as Error).message, { cause: e });
    }
  })();
  if (state.objects.has(args.id) || tlsCredsObjects(state).has(args.id))
    throw generic(`attempt to add duplicate property '${args.id}' to object (type 'container')`);
  const group = new ThrottleGroup({ name: args.id, config });
  const obj: DaemonObject = { id: args.id, type: "throttle-group", props, group };
  state.objects.set(args.id, obj);
  state.throttleGroups.set(args.id, group);
  state.log.info("object added", { id: args.id, "qom-type": args["qom-type"] });
  return obj;
}

/**
 * A QOM path's components, as QEMU walks them (empty ones skipped: `//objects/tg0/` is `/objects/tg0`), and
 * whether it is absolute. A partial path (no leading `/`) names what its components end, anywhere in the
 * tree: `tg0` and `objects/tg0` are `/objects/tg0`.
 */
function qomPath(path: string): { absolute: boolean; parts: string[] } {
  return { absolute: path.startsWith("/"), parts: path.split("/").filter((p) => p !== "") };
}

/** True when `path` names the `/objects` container. */
function isObjectsContainer(path: string): boolean {
  const { parts } = qomPath(path);
  return parts.length === 1 && parts[0] === "objects";
}

function objectAt(state: DaemonState, path: string): DaemonObject | TlsCredsObject {
  const { absolute, parts } = qomPath(path);
  const id =
    parts.length === 2 && parts[0] === "objects"
      ? parts[1]
      : !absolute && parts.length === 1
        ? parts[0]
        : undefined;
  const obj = id === undefined ? undefined : (state.objects.get(id) ?? tlsCredsObjects(state).get(id));
  if (obj === undefined) throw new QmpError("DeviceNotFound", `Device '${path}' not found`);
  return obj;
}

const isTls = (o: DaemonObject | TlsCredsObject): o is TlsCredsObject => o.type !== "throttle-group";

function tlsGet(obj: TlsCredsObject, property: string): string | boolean {
  const v = obj.props[property];
  if (v === undefined) throw generic(`Property '${obj.type}.${property}' not found`);
  return v;
}

/** The object commands. */
export function objectCommands(state: DaemonState): CommandDefinition<never, unknown>[] {
  return [
    defineCommand({
      name: "object-add",
      args: ObjectAddArgs,
      handler: (args) => {
        objectAdd(state, args);
        return {};
      },
    }),
    defineCommand({
      name: "object-del",
      args: IdArgs,
      handler: (args) => {
        const tls = tlsCredsObjects(state);
        if (tls.delete(args.id)) {
          // QEMU 7.2 lets credentials go while a server uses them: the server holds its own reference.
          state.log.info("object deleted", { id: args.id });
          return {};
        }
        const obj = state.objects.get(args.id);
        if (obj === undefined) throw generic(`object '${args.id}' not found`);
        if (obj.group.size > 0) throw generic(`object '${args.id}' is in use, can not be deleted`);
        state.objects.delete(args.id);
        state.throttleGroups.delete(args.id);
        state.log.info("object deleted", { id: args.id });
        return {};
      },
    }),
    defineCommand({
      name: "qom-get",
      args: GetArgs,
      handler: (args): Promise<unknown> => {
        const obj = objectAt(state, args.path);
        if (args.property === "type") return Promise.resolve(obj.type);
        if (isTls(obj)) return Promise.resolve(tlsGet(obj, args.property));
        return qmpErrors(() => obj.props.get(args.property));
      },
    }),
    defineCommand({
      name: "qom-set",
      args: SetArgs,
      handler: async (args) => {
        const obj = objectAt(state, args.path);
        if (isTls(obj)) {
          tlsGet(obj, args.property);
          obj.props[args.property] = tlsProp(obj.type, args.property, args.value, true);
          return {};
        }
        await qmpErrors(() => {
          obj.props.set(args.property, args.value);
          obj.group.setConfig(obj.props.config);
        });
        return {};
      },
    }),
    defineCommand({
      name: "qom-list",
      args: ListArgs,
      handler: (args) => {
        if (isObjectsContainer(args.path)) {
          // The container's own `type`, then its children (QEMU lists them in its hash table's order,
          // blkd in creation order, throttle groups first).
          return [
            { name: "type", type: "string" },
            ...[...state.objects.values(), ...tlsCredsObjects(state).values()].map((o) => ({
              name: o.id,
              type: `child<${o.type}>`,
            })),
          ];
        }
        const obj = objectAt(state, args.path);
        if (isTls(obj))
          return [
            { name: "type", type: "string" },
            ...TLS_PROPS[obj.type].map(([name, type]) => ({ name, type })),
          ];
        return [
          { name: "type", type: "string" },
          ...THROTTLE_GROUP_PROPS.map((name) => ({
            name,
            type: name === "limits" ? "ThrottleLimits" : "int",
          })),
        ];
      },
    }),
  ] as unknown as CommandDefinition<never, unknown>[];
}
