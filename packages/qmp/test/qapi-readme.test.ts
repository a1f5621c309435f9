/** The README example of the QAPI toolkit section, verbatim but for the import path. */
import assert from "node:assert/strict";
import { it } from "vitest";
import { BlockdevOptions, type Infer, parseOptionArgument, QSD_IMPLIED_KEYS, q } from "../src/index.ts";

it("README QAPI toolkit example", () => {
  // The same options from the command line (keyval) and from QMP (JSON) give the same typed value.
  const fromCommandLine = parseOptionArgument(
    BlockdevOptions,
    "qcow2,node-name=disk,file.driver=file,file.filename=/tmp/d.qcow2",
    { impliedKey: QSD_IMPLIED_KEYS.blockdev },
  );
  const fromQmp = BlockdevOptions.parse({
    driver: "qcow2",
    "node-name": "disk",
    file: { driver: "file", filename: "/tmp/d.qcow2" },
  });
  assert.deepEqual(fromCommandLine, fromQmp);

  // Your own command's arguments: one declaration, an inferred type, QEMU's wording on bad input.
  const SetSpeed = q.object({ device: q.str(), speed: q.int() });
  type SetSpeed = Infer<typeof SetSpeed>; // { device: string; speed: number }
  const ok: SetSpeed = SetSpeed.parse({ device: "job0", speed: 0 });
  assert.equal(ok.speed, 0);
  assert.throws(() => SetSpeed.parse({ device: "job0", speed: "fast" }), {
    name: "QmpError",
    errorClass: "GenericError",
    message: "Invalid parameter type for 'speed', expected: integer",
  });
});
