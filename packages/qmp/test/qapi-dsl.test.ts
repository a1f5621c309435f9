/**
 * The schema DSL itself: composition (base, extend, union extend, lazy recursion), declaration errors, type
 * inference, and introspection (compared member by member with qemu-storage-daemon's query-qmp-schema when it
 * is installed, unless BLK_QAPI_QEMU=0).
 */
import { missingPeers, run } from "@blk/testkit";
import { describe, expect, expectTypeOf, it } from "vitest";
import {
  type ArgsSchema,
  BlockdevOptions,
  type BlockdevOptionsInput,
  BlockExportOptions,
  type Infer,
  type InferInput,
  isQmpError,
  NbdServerStartArguments,
  type QapiType,
  q,
  SchemaCatalog,
  type SchemaInfo,
} from "../src/index.ts";

describe("schema DSL", () => {
  it("implements the registry's ArgsSchema contract", () => {
    const Args = q.object({ device: q.str(), speed: q.int() });
    const schema: ArgsSchema<{ device: string; speed: number }> = Args;
    expect(schema.parse({ device: "j", speed: 5 })).toEqual({ device: "j", speed: 5 });
    try {
      schema.parse({ device: "j" });
      expect.unreachable();
    } catch (e) {
      expect(isQmpError(e, "GenericError") && e.toJSON()).toEqual({
        class: "GenericError",
        desc: "Parameter 'speed' is missing",
      });
    }
  });

  it("infers required, optional and defaulted members", () => {
    const Args = q.object({
      device: q.str(),
      force: q.optional(q.bool(), false),
      "job-id": q.optional(q.str()),
      mode: q.optional(q.enum(["safe", "hard"]), "safe"),
      list: q.optional(q.list(q.uint32())),
    });
    expectTypeOf<Infer<typeof Args>>().toEqualTypeOf<{
      device: string;
      force: boolean;
      "job-id"?: string;
      mode: "safe" | "hard";
      list?: number[];
    }>();
    expect(Args.parse({ device: "d", list: [1] })).toEqual({
      device: "d",
      force: false,
      mode: "safe",
      list: [1],
    });
  });

  it("treats members set to undefined as absent (library calls)", () => {
    const Args = q.object({ device: q.str(), force: q.optional(q.bool(), false) });
    expect(Args.parse({ device: "d", force: undefined, other: undefined })).toEqual({
      device: "d",
      force: false,
    });
    expect(() => Args.parse({ device: undefined })).toThrow("Parameter 'device' is missing");
  });

  it("types library input with defaulted members optional", () => {
    const Args = q.object({
      device: q.str(),
      force: q.optional(q.bool(), false),
      "job-id": q.optional(q.str()),
    });
    expectTypeOf<InferInput<typeof Args>>().toEqualTypeOf<{
      device: string;
      force?: boolean;
      "job-id"?: string;
    }>();
    const input: BlockdevOptionsInput = {
      driver: "qcow2",
      "node-name": "disk",
      file: { driver: "file", filename: "/tmp/d.qcow2" },
      backing: null,
    };
    expect(BlockdevOptions.parse(input)).toMatchObject({
      file: { locking: "auto" },
      "cache-clean-interval": 600,
    });
    // @ts-expect-error -- qcow2 needs `file`
    const bad: BlockdevOptionsInput = { driver: "qcow2" };
    expect(() => BlockdevOptions.parse(bad)).toThrow("Parameter 'file' is missing");
  });

  it("puts base members first and refuses redeclaring them", () => {
    const Base = q.object({ id: q.str() });
    const Child = q.object({ extra: q.optional(q.int()) }, { base: Base, name: "Child" });
    expectTypeOf<Infer<typeof Child>>().toEqualTypeOf<{ id: string } & { extra?: number }>();
    expect(Object.keys(Child.members)).toEqual(["id", "extra"]);
    expect(() => Child.parse({ extra: 1 })).toThrow("Parameter 'id' is missing");
    expect(Base.extend({ more: q.bool() }).parse({ id: "x", more: true })).toEqual({ id: "x", more: true });
    expect(() => q.object({ id: q.int() }, { base: Base })).toThrow(TypeError);
    expect(() => Base.extend({ id: q.int() })).toThrow(TypeError);
  });

  it("extends a union with new variants and discriminator values", () => {
    const Vmdk = q.object({ file: q.str() }, { name: "BlockdevOptionsVmdk" });
    const Extended = BlockdevOptions.extend({ variants: { vmdk: Vmdk } });
    const v = Extended.parse({ driver: "vmdk", "node-name": "v", file: "f" });
    expect(v).toEqual({ driver: "vmdk", "node-name": "v", file: "f" });
    if (v.driver === "vmdk") expectTypeOf(v.file).toEqualTypeOf<string>();
    expect(() => BlockdevOptions.parse({ driver: "vmdk" })).toThrow(
      "Parameter 'driver' does not accept value 'vmdk'",
    );
    expect(Extended.parse({ driver: "null-co" })).toMatchObject({ driver: "null-co", size: 1073741824 });
    expect(() => BlockdevOptions.extend({ variants: { raw: Vmdk } })).toThrow(TypeError);
  });

  it("allows discriminator values without a variant", () => {
    const U = q.union({
      base: q.object({ mode: q.enum(["none", "hash"]) }),
      discriminator: "mode",
      variants: { hash: q.object({ hash: q.str() }) },
    });
    expect(U.parse({ mode: "none" })).toEqual({ mode: "none" });
    expect(() => U.parse({ mode: "none", hash: "x" })).toThrow("Parameter 'hash' is unexpected");
    expectTypeOf<Infer<typeof U>>().toEqualTypeOf<{ mode: "none" } | { mode: "hash"; hash: string }>();
  });

  it("rejects malformed declarations", () => {
    const base = q.object({ kind: q.str(), e: q.enum(["a"]) });
    expect(() => q.union({ base, discriminator: "kind", variants: {} })).toThrow(TypeError);
    expect(() => q.union({ base, discriminator: "e", variants: { b: q.object({}) } })).toThrow(TypeError);
    expect(() => q.union({ base, discriminator: "e", variants: { a: q.object({ kind: q.str() }) } })).toThrow(
      TypeError,
    );
    const clash = q.alternate("Clash", { a: q.str(), b: q.enum(["x"]) });
    expect(() => clash.parse("x")).toThrow(TypeError);
  });

  it("dispatches alternates on the JSON kind, keyval scalars to the string branch", () => {
    const StrOrNull = q.alternate("StrOrNull", { s: q.str(), n: q.null() });
    expect(StrOrNull.parse(null)).toBeNull();
    expect(StrOrNull.parse("x")).toBe("x");
    expect(() => StrOrNull.parse(1)).toThrow("Invalid parameter type for 'null', expected: StrOrNull");
    const IntOrBool = q.alternate("IntOrBool", { i: q.int(), b: q.bool() });
    expect(IntOrBool.parse(5)).toBe(5);
    expect(() => IntOrBool.parseKeyval("5")).toThrow(
      "Invalid parameter type for 'null', expected: IntOrBool",
    );
  });

  it("supports recursion through q.lazy", () => {
    interface Tree {
      name: string;
      children?: Tree[];
    }
    const Tree: QapiType<Tree> = q.object({
      name: q.str(),
      children: q.optional(q.list(q.lazy(() => Tree))),
    });
    expect(Tree.parse({ name: "a", children: [{ name: "b", children: [] }] })).toEqual({
      name: "a",
      children: [{ name: "b", children: [] }],
    });
    expect(() => Tree.parse({ name: "a", children: [{ name: "b", children: [{}] }] })).toThrow(
      "Parameter 'children[0].children[0].name' is missing",
    );
  });
});

describe("SchemaCatalog (query-qmp-schema shape)", () => {
  it("lists each type once, optional members with default null, integer widths as int", () => {
    const catalog = new SchemaCatalog();
    const name = catalog.ref(BlockdevOptions);
    const entries = catalog.entries();
    const byName = new Map(entries.map((e) => [e.name, e]));
    expect(name).toBe("BlockdevOptions");
    const union = byName.get("BlockdevOptions");
    expect(union).toMatchObject({ "meta-type": "object", tag: "driver" });
    const members = (union?.members ?? []) as unknown[];
    expect(members[0]).toEqual({ name: "driver", type: "BlockdevDriver" });
    expect(members[1]).toEqual({ name: "node-name", default: null, type: "str" });
    expect(union?.variants).toContainEqual({ case: "qcow2", type: "BlockdevOptionsQcow2" });
    expect(byName.get("BlockdevRef")).toEqual({
      name: "BlockdevRef",
      "meta-type": "alternate",
      members: [{ type: "BlockdevOptions" }, { type: "str" }],
    });
    expect(byName.get("int")).toEqual({ name: "int", "meta-type": "builtin", "json-type": "int" });
    expect(byName.get("[BlkdebugInjectErrorOptions]")).toMatchObject({ "meta-type": "array" });
    expect(new Set(entries.map((e) => e.name)).size).toBe(entries.length);
  });

  it("masks names as numbers like QEMU", () => {
    const catalog = new SchemaCatalog({ mask: true });
    catalog.add({
      name: "nbd-server-start",
      "meta-type": "command",
      "arg-type": catalog.ref(NbdServerStartArguments),
      "ret-type": catalog.ref(q.object({})),
    });
    const entries = catalog.entries();
    expect(entries[0]).toMatchObject({ name: "nbd-server-start", "meta-type": "command", "arg-type": "0" });
    expect(entries[0]?.["ret-type"]).toMatch(/^[1-9]\d*$/);
    expect(
      entries.every((e) => /^(\d+|\[.*\]|str|int|bool|null|number|any|nbd-server-start)$/.test(e.name)),
    ).toBe(true);
  });
});

const live = process.env.BLK_QAPI_QEMU !== "0" && missingPeers(["qemu-storage-daemon"]).length === 0;

describe.skipIf(!live)(
  "members agree with qemu-storage-daemon's query-qmp-schema",
  { tags: ["qemu"] },
  () => {
    it("for every variant of BlockdevOptions and BlockExportOptions, and nbd-server-start", async () => {
      const input = [
        '{"execute":"qmp_capabilities"}',
        '{"execute":"query-qmp-schema","id":1}',
        '{"execute":"quit"}',
      ];
      const r = await run("qemu-storage-daemon", ["--chardev", "stdio,id=m", "--monitor", "chardev=m"], {
        input: `${input.join("\n")}\n`,
        timeoutMs: 20_000,
      });
      const line = r.stdout.split("\n").find((l) => l.includes('"id": 1'));
      const qemu = (JSON.parse(line ?? "{}") as { return: SchemaInfo[] }).return;
      const qemuByName = new Map(qemu.map((e) => [e.name, e]));
      const shape = (info: SchemaInfo | undefined, lookup: (n: string) => SchemaInfo | undefined): unknown =>
        ((info?.members ?? []) as { name: string; default?: null; type: string }[]).map((m) => {
          const t = lookup(m.type);
          const kind = t === undefined ? m.type : t["meta-type"] === "builtin" ? t.name : t["meta-type"];
          return `${m.name}${"default" in m ? "?" : ""}:${kind}`;
        });
      const command = (n: string): SchemaInfo | undefined =>
        qemu.find((e) => e.name === n && e["meta-type"] === "command");

      const ours = new SchemaCatalog();
      const oursByName = (): Map<string, SchemaInfo> => new Map(ours.entries().map((e) => [e.name, e]));
      for (const [cmd, schema] of [
        ["blockdev-add", BlockdevOptions],
        ["block-export-add", BlockExportOptions],
        ["nbd-server-start", NbdServerStartArguments],
      ] as const) {
        const theirs = qemuByName.get(String(command(cmd)?.["arg-type"]));
        const ourName = ours.ref(schema);
        const m = oursByName();
        const mine = m.get(ourName);
        expect(
          shape(mine, (n) => m.get(n)),
          cmd,
        ).toEqual(shape(theirs, (n) => qemuByName.get(n)));
        const theirVariants = new Map(
          ((theirs?.variants ?? []) as { case: string; type: string }[]).map((v) => [v.case, v.type]),
        );
        for (const v of (mine?.variants ?? []) as { case: string; type: string }[]) {
          expect(
            shape(m.get(v.type), (n) => m.get(n)),
            `${cmd} ${v.case}`,
          ).toEqual(shape(qemuByName.get(theirVariants.get(v.case) ?? ""), (n) => qemuByName.get(n)));
        }
      }
    });
  },
);
