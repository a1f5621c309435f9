// The README example, kept runnable: a server with one command and a client calling it over a unix socket.
import { makeTempDir } from "@blk/testkit";
import { expect, it } from "vitest";
// README: import { CommandRegistry, defineCommand, QmpClient, QmpError, QmpServer } from "@blk/qmp";
import { CommandRegistry, defineCommand, QmpClient, QmpError, QmpServer } from "../src/index.ts";

it("README example", async () => {
  await using dir = makeTempDir("qmp-readme");
  const path = dir.join("qmp.sock");

  // --- README example start ---
  const registry = new CommandRegistry({
    version: { qemu: { micro: 0, minor: 2, major: 7 }, package: "blk 0.1.0" },
  });
  registry.add(
    defineCommand({
      name: "x-blk-greet",
      args: {
        // any ArgsSchema works here; the QAPI toolkit's object schemas implement it
        parse(value: unknown): { name: string } {
          const name = (value as { name?: unknown }).name;
          if (name === undefined) throw new QmpError("GenericError", "Parameter 'name' is missing");
          if (typeof name !== "string")
            throw new QmpError("GenericError", "Invalid parameter type for 'name', expected: string");
          return { name };
        },
      },
      handler: ({ name }, ctx) => {
        ctx.emit("X_BLK_GREETED", { name }); // written before the return
        return { text: `hello, ${name}` };
      },
    }),
  );

  await using server = new QmpServer({ registry });
  await server.listen({ path });

  await using qmp = await QmpClient.connect({ path });
  const mark = qmp.eventMark();
  const reply = await qmp.execute<{ text: string }>("x-blk-greet", { name: "world" });
  const event = await qmp.waitEvent("X_BLK_GREETED", { since: mark });
  // --- README example end ---

  expect(reply).toEqual({ text: "hello, world" });
  expect(event.data).toEqual({ name: "world" });
  await expect(qmp.execute("x-blk-greet", {})).rejects.toMatchObject({
    errorClass: "GenericError",
    desc: "Parameter 'name' is missing",
  });
});
