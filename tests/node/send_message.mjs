// Send one message the way a JS producer does: @azure/storage-queue v12, plain text body.
// Usage: AzureWebJobsStorage=<connection string> node tests/node/send_message.mjs <queueName> <jsonBody>
// The body is sent as-is (not validated, not Base64-encoded) so tests can send poison too.
// Prints {"messageId": "..."} on stdout; exits 1 on failure, 2 on bad usage.
import { QueueServiceClient } from "@azure/storage-queue";

function fail(code, message) {
  process.stderr.write(`send_message: ${message}\n`);
  process.exit(code);
}

async function main(argv) {
  if (argv.length !== 2) {
    fail(2, "usage: node tests/node/send_message.mjs <queueName> <jsonBody>");
  }
  const [queueName, body] = argv;
  const connectionString = process.env.AzureWebJobsStorage;
  if (!connectionString) {
    fail(2, "environment variable AzureWebJobsStorage is not set");
  }
  // Short retries: a test waiting on this script should fail in seconds, not minutes.
  const service = QueueServiceClient.fromConnectionString(connectionString, {
    retryOptions: { maxTries: 2, retryDelayInMs: 200, maxRetryDelayInMs: 1000, tryTimeoutInMs: 10000 },
  });
  const queue = service.getQueueClient(queueName);
  await queue.createIfNotExists();
  const result = await queue.sendMessage(body);
  process.stdout.write(`${JSON.stringify({ messageId: result.messageId })}\n`);
}

main(process.argv.slice(2)).catch((err) => {
  const details = [err?.name, err?.code, err?.statusCode].filter((x) => x !== undefined && x !== "");
  fail(1, `${details.length ? `[${details.join(" ")}] ` : ""}${err?.message ?? String(err)}`);
});
