/**
 * `query-qmp-schema`: SchemaInfo entries (type names masked as QEMU does) derived from the registered
 * commands' argument schemas and the events blkd emits. Commands whose arguments are not QAPI schemas
 * (`object-add`) are described by their common members; return types are `any`.
 */
import {
  type CommandDefinition,
  type CommandRegistry,
  defineCommand,
  QapiType,
  q,
  SchemaCatalog,
} from "@blk/qmp";

const EMPTY = q.object({});
const ANY = q.any();

/** Event data schemas of the events blkd emits (QEMU 7.2 members). */
const EVENTS: Record<string, QapiType<unknown>> = {
  BLOCK_EXPORT_DELETED: q.object({ id: q.str() }),
  JOB_STATUS_CHANGE: q.object({ id: q.str(), status: q.str() }),
  BLOCK_JOB_READY: q.object({
    type: q.str(),
    device: q.str(),
    len: q.int(),
    offset: q.int(),
    speed: q.int(),
  }),
  BLOCK_JOB_COMPLETED: q.object({
    type: q.str(),
    device: q.str(),
    len: q.int(),
    offset: q.int(),
    speed: q.int(),
    error: q.optional(q.str()),
  }),
  BLOCK_JOB_CANCELLED: q.object({
    type: q.str(),
    device: q.str(),
    len: q.int(),
    offset: q.int(),
    speed: q.int(),
  }),
  BLOCK_JOB_ERROR: q.object({ device: q.str(), operation: q.str(), action: q.str() }),
  BLOCK_JOB_PENDING: q.object({ type: q.str(), id: q.str() }),
};

const OBJECT_ADD = q.object({ "qom-type": q.enum(["throttle-group"], { name: "ObjectType" }), id: q.str() });

/** The control commands blkd adds to the registry's builtins. */
export function controlCommands(registry: CommandRegistry): CommandDefinition<never, unknown>[] {
  return [
    defineCommand({
      name: "query-qmp-schema",
      handler: () => {
        const catalog = new SchemaCatalog({ mask: true });
        for (const name of registry.names()) {
          const def = registry.get(name);
          if (def === undefined) continue;
          const args =
            def.args instanceof QapiType
              ? (def.args as QapiType<unknown>)
              : name === "object-add"
                ? OBJECT_ADD
                : EMPTY;
          catalog.add({
            name,
            "meta-type": "command",
            "arg-type": catalog.ref(args),
            "ret-type": catalog.ref(ANY),
            "allow-oob": def.allowOob === true,
          });
        }
        for (const [name, data] of Object.entries(EVENTS))
          catalog.add({ name, "meta-type": "event", "arg-type": catalog.ref(data) });
        return catalog.entries();
      },
    }),
  ] as unknown as CommandDefinition<never, unknown>[];
}
