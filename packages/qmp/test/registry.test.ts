import { describe, expect, it } from "vitest";
import {
  type ArgsSchema,
  type CommandContext,
  CommandRegistry,
  defineCommand,
  encodeQmpJson,
  isQmpError,
  QmpError,
} from "../src/index.ts";

const ctx = (events: unknown[] = []): CommandContext => ({
  session: undefined,
  emit: (event, data) => events.push({ event, data }),
  signal: new AbortController().signal,
  afterResponse: () => {},
});

const failure = async (p: Promise<unknown>): Promise<QmpError> => {
  try {
    await p;
  } catch (e) {
    if (e instanceof QmpError) return e;
    throw e;
  }
  throw new Error("expected a QmpError");
};

/** A tiny stand-in for a QAPI toolkit schema: `speed?: int = 0`. */
const speedArgs: ArgsSchema<{ speed: number }> = {
  parse(value: unknown) {
    const { speed = 0, ...rest } = value as { speed?: unknown };
    const extra = Object.keys(rest)[0];
    if (extra !== undefined) throw new QmpError("GenericError", `Parameter '${extra}' is unexpected`);
    if (typeof speed !== "number")
      throw new QmpError("GenericError", "Invalid parameter type for 'speed', expected: integer");
    return { speed };
  },
};

describe("CommandRegistry", () => {
  it("has QEMU's control commands built in, with query-version in QEMU's member order", async () => {
    const r = new CommandRegistry({
      version: { qemu: { micro: 0, minor: 2, major: 7 }, package: "blk 0.1.0" },
    });
    expect(r.names()).toEqual(["qmp_capabilities", "query-version", "query-commands"]);
    expect(encodeQmpJson(await r.dispatch("query-version", undefined, ctx()))).toBe(
      '{"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "blk 0.1.0"}',
    );
    r.add(defineCommand({ name: "query-jobs", handler: () => [] }));
    expect(await r.dispatch("query-commands", {}, ctx())).toEqual([
      { name: "qmp_capabilities" },
      { name: "query-version" },
      { name: "query-commands" },
      { name: "query-jobs" },
    ]);
    const again = await failure(r.dispatch("qmp_capabilities", {}, ctx()));
    expect([again.errorClass, again.desc]).toEqual([
      "CommandNotFound",
      "Capabilities negotiation is already complete, command ignored",
    ]);
    expect((await failure(r.dispatch("qmp_capabilities", { x: 1 }, ctx()))).desc).toBe(
      "Parameter 'x' is unexpected",
    );
    expect(new CommandRegistry({ builtins: false }).names()).toEqual([]);
  });

  it("answers unknown commands and unexpected arguments as QEMU does", async () => {
    const r = new CommandRegistry();
    const unknown = await failure(r.dispatch("no-such-command", undefined, ctx()));
    expect([unknown.errorClass, unknown.desc]).toEqual([
      "CommandNotFound",
      "The command no-such-command has not been found",
    ]);
    const extra = await failure(r.dispatch("query-version", { x: 1 }, ctx()));
    expect([extra.errorClass, extra.desc]).toEqual(["GenericError", "Parameter 'x' is unexpected"]);
  });

  it("validates through the ArgsSchema and passes the parsed value to the handler", async () => {
    const r = new CommandRegistry();
    const seen: number[] = [];
    r.add(
      defineCommand({
        name: "block-job-set-speed",
        args: speedArgs,
        handler: ({ speed }, c) => {
          seen.push(speed);
          c.emit("X_SPEED", { speed });
        },
      }),
    );
    const events: unknown[] = [];
    expect(await r.dispatch("block-job-set-speed", undefined, ctx(events))).toEqual({});
    expect(await r.dispatch("block-job-set-speed", { speed: 5 }, ctx(events))).toEqual({});
    expect(seen).toEqual([0, 5]);
    expect(events).toEqual([
      { event: "X_SPEED", data: { speed: 0 } },
      { event: "X_SPEED", data: { speed: 5 } },
    ]);
    const bad = await failure(r.dispatch("block-job-set-speed", { speed: "fast" }, ctx()));
    expect(bad.desc).toBe("Invalid parameter type for 'speed', expected: integer");
    expect(seen).toEqual([0, 5]); // no side effect on bad arguments
  });

  it("keeps handler error classes and turns anything else into GenericError", async () => {
    const r = new CommandRegistry();
    r.add({
      name: "block-job-cancel",
      handler: () => {
        throw new QmpError("DeviceNotActive", "Block job 'j' not found");
      },
    });
    r.add({
      name: "x-bug",
      handler: async () => {
        await Promise.resolve();
        throw new RangeError("offset out of range");
      },
    });
    r.add({
      name: "x-throw-string",
      handler: () => {
        // eslint-disable-next-line @typescript-eslint/only-throw-error -- a handler that throws a non-Error
        throw "plain string";
      },
    });
    r.add({
      name: "x-bad-return",
      returns: {
        parse: () => {
          throw new Error("bad return");
        },
      },
      handler: () => 1,
    });
    expect(isQmpError(await failure(r.dispatch("block-job-cancel", {}, ctx())), "DeviceNotActive")).toBe(
      true,
    );
    const bug = await failure(r.dispatch("x-bug", {}, ctx()));
    expect([bug.errorClass, bug.desc]).toEqual(["GenericError", "offset out of range"]);
    expect(bug.cause).toBeInstanceOf(RangeError);
    expect((await failure(r.dispatch("x-throw-string", {}, ctx()))).desc).toBe("plain string");
    expect((await failure(r.dispatch("x-bad-return", {}, ctx()))).desc).toBe("bad return");
  });

  it("refuses duplicate names unless replaced, and removes", () => {
    const r = new CommandRegistry();
    expect(() => r.add({ name: "query-version", handler: () => ({}) })).toThrow(/already registered/);
    r.replace({ name: "query-version", handler: () => "mine" });
    expect(r.has("query-version")).toBe(true);
    expect(r.remove("query-version")).toBe(true);
    expect(r.get("query-version")).toBeUndefined();
  });
});
