#!/usr/bin/env node
// A storefront backend in Node.js calling the Studio over plain gRPC, as a non-Python client
// would: @grpc/grpc-js for the transport, @grpc/proto-loader reading the published .proto files
// (no generated code). It creates a session from a person photo and a garment, streams the
// fMP4 chunks into one file, switches to a second garment mid-stream and reports, as one JSON
// line on stdout, what it received. tests/integration/test_standard_grpc.py runs it against
// the real suite and decodes the file.
//
//   node storefront.js --target 127.0.0.1:9000 --api-key KEY --protos ../../../protos \
//     --person person.png --garment red.png --switch-garment green.png --out clip.mp4
//
// Auth is the API key in metadata, as `x-api-key` and `authorization: Bearer <key>`; Ray
// Serve's gRPC proxy routes on the `application` metadata (the Serve application's name).
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

function parseArgs(argv) {
  const opts = {
    application: 'fashionchameleon',
    prompt: 'a person walks towards the camera',
    maxChunks: 6,
    switchAt: 1,
    seed: 7,
    timeoutS: 300,
    protos: path.join(__dirname, '..', '..', '..', 'protos'),
  };
  const names = {
    '--target': 'target', '--api-key': 'apiKey', '--protos': 'protos', '--application': 'application',
    '--person': 'person', '--garment': 'garment', '--switch-garment': 'switchGarment', '--out': 'out',
    '--prompt': 'prompt', '--max-chunks': 'maxChunks', '--switch-at': 'switchAt', '--seed': 'seed',
    '--timeout-s': 'timeoutS',
  };
  for (let i = 2; i < argv.length; i += 2) {
    const key = names[argv[i]];
    if (!key || i + 1 >= argv.length) throw new Error(`bad argument ${argv[i]}`);
    const value = argv[i + 1];
    opts[key] = ['maxChunks', 'switchAt', 'seed', 'timeoutS'].includes(key) ? Number(value) : value;
  }
  for (const required of ['target', 'apiKey', 'protos', 'person', 'garment', 'switchGarment', 'out']) {
    if (!opts[required]) throw new Error(`missing --${required.replace(/[A-Z]/g, (c) => '-' + c.toLowerCase())}`);
  }
  return opts;
}

function loadStudio(protosDir) {
  const definition = protoLoader.loadSync('fashionchameleon/v1/studio.proto', {
    includeDirs: [path.resolve(protosDir)],
    keepCase: true, // field names as in the .proto (session_id, not sessionId)
    longs: Number, // int64 chunk indices fit a double for any real session
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).fashionchameleon.v1;
}

function unary(client, method, request, metadata, deadlineS) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: Date.now() + deadlineS * 1000 }, (err, response) => {
      if (err) reject(new Error(`${method}: ${grpc.status[err.code]} ${err.details}`));
      else resolve(response);
    });
  });
}

async function main() {
  const opts = parseArgs(process.argv);
  const v1 = loadStudio(opts.protos);
  const client = new v1.Studio(opts.target, grpc.credentials.createInsecure(), {
    'grpc.max_send_message_length': 64 * 2 ** 20,
    'grpc.max_receive_message_length': 64 * 2 ** 20,
  });
  const metadata = new grpc.Metadata();
  metadata.set('x-api-key', opts.apiKey);
  metadata.set('authorization', `Bearer ${opts.apiKey}`);
  metadata.set('application', opts.application);

  const image = (file) => ({ data: fs.readFileSync(file), content_type: 'image/png' });
  const session = await unary(client, 'CreateSession', {
    reference: image(opts.person),
    garment: image(opts.garment),
    prompt: opts.prompt,
    options: { seed: opts.seed, max_chunks: opts.maxChunks },
  }, metadata, 120);

  const out = fs.openSync(opts.out, 'w');
  const chunks = [];
  let switchResponse = null;
  let switching = null;
  let endState = null;
  const started = Date.now();

  await new Promise((resolve, reject) => {
    const call = client.StreamSession(
      { session_id: session.session_id, resume_from_index: 0 }, metadata,
      { deadline: Date.now() + opts.timeoutS * 1000 },
    );
    call.on('data', (chunk) => {
      if (chunk.fmp4.length > 0) fs.writeSync(out, chunk.fmp4);
      chunks.push({
        index: chunk.index,
        bytes: chunk.fmp4.length,
        num_frames: chunk.num_frames,
        first_frame_index: chunk.first_frame_index,
        start_seconds: chunk.start_seconds,
        duration_seconds: chunk.duration_seconds,
        fps: chunk.fps,
        garment_id: chunk.garment_id,
        switch_applied: chunk.switch_applied,
        is_init_segment_included: chunk.is_init_segment_included,
        end_of_stream: chunk.end_of_stream,
        mime_type: chunk.mime_type,
      });
      if (chunk.end_of_stream) endState = chunk.end_state;
      if (switching === null && !chunk.end_of_stream && chunk.index >= opts.switchAt) {
        // The switch is a separate unary call while the stream keeps running.
        switching = unary(client, 'SwitchGarment', {
          session_id: session.session_id,
          garment: image(opts.switchGarment),
          request_id: `node-switch-${session.session_id.slice(0, 16)}`,
        }, metadata, 60).then((r) => { switchResponse = r; }, reject);
      }
    });
    call.on('error', (err) => reject(new Error(`StreamSession: ${grpc.status[err.code]} ${err.details}`)));
    call.on('end', resolve);
  });
  if (switching !== null) await switching;
  fs.closeSync(out);
  const closed = await unary(client, 'CloseSession', { session_id: session.session_id }, metadata, 60);
  client.close();

  process.stdout.write(JSON.stringify({
    session_id: session.session_id,
    initial_garment_id: session.garment_id,
    fps: session.fps,
    width: session.width,
    height: session.height,
    chunks,
    end_state: endState,
    close_state: closed.state,
    switch: switchResponse && {
      effective_chunk_index: switchResponse.effective_chunk_index,
      garment_id: switchResponse.garment_id,
    },
    out: opts.out,
    elapsed_s: (Date.now() - started) / 1000,
    node: process.version,
    grpc_js: require('@grpc/grpc-js/package.json').version,
  }) + '\n');
}

main().catch((err) => {
  process.stderr.write(`storefront: ${err.stack || err}\n`);
  process.exit(1);
});
