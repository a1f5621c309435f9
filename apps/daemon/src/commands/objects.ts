/**
 * QOM objects: `object-add`, `object-del`, `qom-get`, `qom-set`, `qom-list` for `throttle-group`
 * objects (spec/qmp.md §3.8, spec/throttle.md §4.4), over `@blk/throttle`'s ThrottleGroupProperties.
 */
import { type ArgsSchema, type CommandDefinition, defineCommand, QmpError, q } from "@blk/qmp";
import { ThrottleGroup, ThrottleGroupProperties } from "@blk/throttle";
import type { DaemonObject, DaemonState } from "../context.ts";
import { generic, qmpErrors } from "../errors.ts";

/** The object types blkd can create (QEMU's `ObjectType` enum has many more). */
export const OBJECT_TYPES: readonly string[] = ["throttle-group"];

/** `object-add` arguments: `qom-type`, `id` and the type's properties (kept as given, in order). */
export interface ObjectAddArgs {
  "qom-type": "throttle-group";
  id: string;
  props: Record<string, unknown>;
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
    return { "qom-type": "throttle-group", id, props };
  },
};

const IdArgs = q.object({ id: q.str() });
const GetArgs = q.object({ path: q.str(), property: q.str() });
const SetArgs = q.object({ path: q.str(), property: q.str(), value: q.any() });
const ListArgs = q.object({ path: q.str() });

/** Creates a throttle-group object (the one path of `object-add` and `--object`). */
export function objectAdd(state: DaemonState, args: ObjectAddArgs): DaemonObject {
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
  if (state.objects.has(args.id))
    throw generic(`attempt to add duplicate property '${args.id}' to object (type 'container')`);
  const group = new ThrottleGroup({ name: args.id, config });
  const obj: DaemonObject = { id: args.id, type: "throttle-group", props, group };
  state.objects.set(args.id, obj);
  state.throttleGroups.set(args.id, group);
  state.log.info("object added", { id: args.id, "qom-type": args["qom-type"] });
  return obj;
}

function objectAt(state: DaemonState, path: string): DaemonObject {
  const m = /^\/objects\/([^/]+)$/.exec(path);
  const obj = m?.[1] === undefined ? undefined : state.objects.get(m[1]);
  if (obj === undefined) throw new QmpError("DeviceNotFound", `Device '${path}' not found`);
  return obj;
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
        return qmpErrors(() => obj.props.get(args.property));
      },
    }),
    defineCommand({
      name: "qom-set",
      args: SetArgs,
      handler: async (args) => {
        const obj = objectAt(state, args.path);
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
        if (args.path === "/objects" || args.path === "/objects/") {
          return [...state.objects.values()].map((o) => ({ name: o.id, type: `child<${o.type}>` }));
        }
        objectAt(state, args.path);
        return [
          { name: "type", type: "string" },
          { name: "limits", type: "ThrottleLimits" },
        ];
      },
    }),
  ] as unknown as CommandDefinition<never, unknown>[];
}
