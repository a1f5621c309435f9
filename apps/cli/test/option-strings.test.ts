/** `--object` definitions and `-o` option lists, checked as qemu-img 7.2 checks them (messages verified). */
import { describe, expect, it } from "vitest";
import { CliError } from "../src/errors.ts";
import { checkObjectDefinition, checkOptionList, getopt } from "../src/getopt.ts";

function failure(fn: () => unknown): { message: string; exitCode: number; bare: readonly string[] } {
  try {
    fn();
  } catch (e) {
    if (e instanceof CliError) return { message: e.message, exitCode: e.exitCode, bare: e.bare };
    throw e;
  }
  throw new Error("no error");
}

describe("--object", () => {
  it("parses keyval with qom-type implied and ,, escapes in values", () => {
    expect([...checkObjectDefinition("secret,id=s0,data=a,,b,format=raw")]).toEqual([
      ["qom-type", "secret"],
      ["id", "s0"],
      ["data", "a,b"],
      ["format", "raw"],
    ]);
    expect(checkObjectDefinition("qom-type=throttle-group,id=t.0-x_1").get("qom-type")).toBe(
      "throttle-group",
    );
  });

  it.each([
    ["", "Parameter 'qom-type' is missing"],
    ["id=x", "Parameter 'qom-type' is missing"],
    ["foo,id=x", "Parameter 'qom-type' does not accept value 'foo'"],
    ["secret", "Parameter 'id' is missing"],
    ["foo,bar", "Expected '=' after parameter 'bar'"],
    ["secret,id", "Expected '=' after parameter 'id'"],
    [",id=x", "Invalid parameter ''"],
    ["secret,,x", "Invalid parameter ''"],
    ["secret,id=x", "Either 'file' or 'data' must be provided"],
  ])("%j: %s", (text, message) => {
    expect(failure(() => checkObjectDefinition(text))).toEqual({ message, exitCode: 1, bare: [] });
  });

  it("an id that is not an identifier: QEMU's two lines; the exit code is the caller's", () => {
    expect(failure(() => checkObjectDefinition("secret,id=1x,data=a", 2))).toEqual({
      message: "Parameter 'id' expects an identifier",
      exitCode: 2,
      bare: ["Identifiers consist of letters, digits, '-', '.', '_', starting with a letter."],
    });
  });

  it("getopt checks --object while parsing, before later options and operands", () => {
    const long = [{ name: "object", hasArg: true }];
    expect(getopt(["--object", "secret,id=a,data=b", "x"], "f:", long).options).toEqual([
      { key: "object", value: "secret,id=a,data=b" },
    ]);
    expect(
      failure(() => getopt(["--object=nope,id=a", "--bogus"], "f:", long, { objectExitCode: 2 })),
    ).toEqual({
      message: "Parameter 'qom-type' does not accept value 'nope'",
      exitCode: 2,
      bare: [],
    });
  });
});

describe("-o option lists", () => {
  it.each([[""], [","], [",a"], ["a,"], ["a,,,"], ["size=1M,"]])("%j is refused", (text) => {
    expect(failure(() => checkOptionList(text)).message).toBe(`Invalid option list: ${text}`);
  });
  it.each([["a"], ["a,,"], ["a=1,b=2"], ["a=x,,y"]])("%j is accepted", (text) => {
    expect(() => checkOptionList(text)).not.toThrow();
  });
});
