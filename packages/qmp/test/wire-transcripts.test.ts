import { describe, expect, it } from "vitest";
import { QmpServer } from "../src/index.ts";
import { Collector, duplexPair, stubRegistry } from "./fixtures/harness.ts";
import { TRANSCRIPT_EXCHANGES } from "./fixtures/transcripts.ts";

const maskTimestamps = (s: string): string =>
  s.replace(
    /"timestamp": \{"seconds": -?\d+, "microseconds": -?\d+\}/g,
    '"timestamp": {"seconds": 0, "microseconds": 0}',
  );

describe("QmpServer replays the protocol-level transcripts of qmp-transcripts.md byte for byte", () => {
  for (const exchange of TRANSCRIPT_EXCHANGES) {
    it(exchange.source, async () => {
      let quits = 0;
      const server = new QmpServer({ registry: stubRegistry(), onQuit: () => void quits++ });
      const [client, serverSide] = duplexPair();
      const out = new Collector(client);
      server.attach(serverSide);
      // Group the transcript into (request, expected answer lines) steps; the greeting comes first.
      const steps: { send: string | undefined; expect: string }[] = [{ send: undefined, expect: "" }];
      for (const line of exchange.lines) {
        if (line.dir === "C") steps.push({ send: `${line.text}\n`, expect: "" });
        else (steps[steps.length - 1] as { expect: string }).expect += `${line.text}\r\n`;
      }
      for (const step of steps) {
        if (step.send !== undefined) client.write(step.send);
        const got = await out.take(step.expect.length);
        expect(maskTimestamps(got), `after ${step.send ?? "connect"}`).toBe(maskTimestamps(step.expect));
      }
      expect(quits).toBe(exchange.lines.some((l) => l.text.includes('"quit"')) ? 1 : 0);
      await server.close();
    });
  }
});
