/**
 * Introspection in the shape of QEMU's `query-qmp-schema` (SchemaInfo entries): every type reachable from what is
 * registered, named once; optional members carry `"default": null`. With `mask`, non-builtin type names are
 * replaced by numbers as QEMU does.
 */
import { BuiltinType, LazyType, ListType, type QapiType, type SchemaInfo } from "./types.ts";

/** Options of {@link SchemaCatalog}. */
export interface SchemaCatalogOptions {
  /** Replace type names (not builtin ones) with `"0"`, `"1"`, … as QEMU's `query-qmp-schema` does. */
  mask?: boolean;
}

/**
 * Collects SchemaInfo entries for types and for the commands and events that use them.
 * @example
 * const catalog = new SchemaCatalog({ mask: true });
 * catalog.add({ name: "blockdev-add", "meta-type": "command", "arg-type": catalog.ref(BlockdevOptions),
 *   "ret-type": catalog.ref(q.object({})), "allow-oob": false });
 * catalog.entries(); // → the query-qmp-schema return value
 */
export class SchemaCatalog {
  private readonly mask: boolean;
  private readonly names = new Map<QapiType<unknown>, string>();
  private readonly types: SchemaInfo[] = [];
  private readonly others: SchemaInfo[] = [];
  private readonly builtins = new Set<string>();
  private readonly arrays = new Set<string>();
  private counter = 0;

  constructor(options?: SchemaCatalogOptions) {
    this.mask = options?.mask ?? false;
  }

  /** The (possibly masked) name of `type`; registers it and every type it references. */
  ref(type: QapiType<unknown>): string {
    let t = type;
    while (t instanceof LazyType) t = t.target;
    const known = this.names.get(t);
    if (known !== undefined) return known;
    if (t instanceof BuiltinType) {
      // QEMU's introspection knows one integer type, "int", whatever the width.
      const info = t.describe();
      const name = info["json-type"] === "int" ? "int" : t.name;
      this.names.set(t, name);
      if (!this.builtins.has(name)) {
        this.builtins.add(name);
        this.types.push({ ...info, name });
      }
      return name;
    }
    if (t instanceof ListType) {
      const name = `[${this.ref(t.element)}]`;
      this.names.set(t, name);
      if (!this.arrays.has(name)) {
        this.arrays.add(name);
        this.types.push({ name, "meta-type": "array", "element-type": this.ref(t.element) });
      }
      return name;
    }
    const name = this.mask ? String(this.counter++) : (t.name ?? `q_obj_${String(this.counter++)}`);
    this.names.set(t, name);
    const slot = this.types.length;
    this.types.push({ name, "meta-type": t.kind });
    const info = t.describe((x) => this.ref(x));
    this.types[slot] = { ...info, name };
    return name;
  }

  /** Adds a command or event entry (its types should come from {@link SchemaCatalog.ref}). */
  add(info: SchemaInfo): void {
    this.others.push(info);
  }

  /** Commands and events first, then types, each in registration order. */
  entries(): SchemaInfo[] {
    return [...this.others, ...this.types];
  }
}
