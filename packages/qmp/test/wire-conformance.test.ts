import { describe, expect, it } from "vitest";
import { QmpServer } from "../src/index.ts";
import { Collector, duplexPair, stubRegistry } from "./fixtures/harness.ts";
import { HOSTILE_INPUTS } from "./fixtures/hostile-inputs.ts";
import { QSD_GREETING, QSD_HOSTILE } from "./fixtures/qsd-hostile.ts";

describe("QmpServer answers hostile input byte for byte as qemu-storage-daemon 7.2.22", () => {
  it("has a recording for every input (else run test/fixtures/regenerate-qsd-hostile.ts)", () => {
    expect(QSD_HOSTILE.map((c) => c.send)).toEqual(HOSTILE_INPUTS);
  });

  it("replays test/fixtures/qsd-hostile.ts on one session", async () => {
    const server = new QmpServer({ registry: stubRegistry() });
    const [client, serverSide] = duplexPair();
    const out = new Collector(client);
    server.attach(serverSide);
    expect(await out.take(QSD_GREETING.length)).toBe(QSD_GREETING);
    const mismatches: string[] = [];
    for (const { send, recv } of QSD_HOSTILE) {
      client.write(Buffer.from(send, "latin1"));
      const got = await out.take(recv.length, recv.length === 0 ? 5 : 2000);
      if (got !== recv)
        mismatches.push(
          `send ${JSON.stringify(send.slice(0, 80))}\n  want ${JSON.stringify(recv)}\n  got  ${JSON.stringify(got)}`,
        );
    }
    expect(mismatches.join("\n")).toBe("");
    await server.close();
  });
});
