BEGIN TRANSACTION;
CREATE TABLE attempts (
            request_key TEXT NOT NULL,
            origin TEXT NOT NULL,
            run_id INTEGER REFERENCES runs (id),
            number INTEGER NOT NULL,
            started_at TEXT NOT NULL,
            latency_ms REAL NOT NULL,
            status_code INTEGER,
            outcome TEXT NOT NULL,
            error TEXT,
            wait_s REAL
        );
INSERT INTO "attempts" VALUES('sha256:bdfa7456d27d424e6c2af2c54fd587ae0d08a46e1828781eab50f9a70984de12','simulator',1,1,'2026-11-25T10:19:24.884Z',1.5,200,'unusable','response cut short at max_tokens (finish_reason=length); raise max_tokens and run again',NULL);
INSERT INTO "attempts" VALUES('sha256:bd0dc6dfd4d152fcb2181281fad9b08599edf6ac8a5aa8acffa8ab27c65b8bc6','simulator',1,1,'2026-11-25T10:19:24.886Z',2.2,200,'ok',NULL,NULL);
INSERT INTO "attempts" VALUES('sha256:fe6d36e18ceb6bc38cd3be3f831fd8ae4666ae6a03bd1637c3b624e71f4597ac','simulator',1,1,'2026-11-25T10:19:24.887Z',1.9,400,'error','Simulated error 400.',NULL);
INSERT INTO "attempts" VALUES('sha256:fe6d36e18ceb6bc38cd3be3f831fd8ae4666ae6a03bd1637c3b624e71f4597ac','simulator',2,1,'2026-11-25T10:19:40.849Z',423.9,400,'error','Simulated error 400.',NULL);
CREATE TABLE calls (
            request_key TEXT NOT NULL,
            origin TEXT NOT NULL,
            model TEXT NOT NULL,
            request TEXT NOT NULL,
            response TEXT,
            output TEXT,
            post_key TEXT,
            status TEXT NOT NULL CHECK (status IN ('done', 'failed')),
            error_class TEXT,
            error TEXT,
            attempts INTEGER NOT NULL,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            cached_tokens INTEGER,
            cost_usd REAL,
            latency_ms REAL,
            started_at TEXT NOT NULL,
            finished_at TEXT NOT NULL,
            run_id INTEGER REFERENCES runs (id),
            PRIMARY KEY (request_key, origin)
        );
INSERT INTO "calls" VALUES('sha256:6705d6c9a27021ae8859cca90f7e25bfef326bb1a7d259b61c5b1372d9081c1f','simulator','gpt-4o-mini','{"max_tokens": 60, "messages": [{"content": "Answer the question in one short sentence.", "role": "system"}, {"content": "What is 1 plus 1?", "role": "user"}], "model": "gpt-4o-mini", "temperature": 0}','{"id": "chatcmpl-6705d6c9a27021ae8859cca9", "object": "chat.completion", "created": 1795601964, "model": "gpt-4o-mini", "choices": [{"index": 0, "finish_reason": "stop", "logprobs": null, "message": {"role": "assistant", "content": "Simulated reply 196a446e: golf victor romeo charlie mike echo. You asked: What is 1 plus 1?", "refusal": null}}], "usage": {"prompt_tokens": 25, "completion_tokens": 29, "total_tokens": 54, "prompt_tokens_details": {"cached_tokens": 0}}, "system_fingerprint": "fp_flow_simulator"}','"what is 1 plus 1?"','sha256:9c2ded596788edcd54fbbc8c8a741a50e8ca669fcfabb32bc1f216672b1c2d61','done',NULL,NULL,0,NULL,NULL,NULL,NULL,NULL,'2026-11-25T10:19:40.845Z','2026-11-25T10:19:40.845Z',2);
INSERT INTO "calls" VALUES('sha256:d76aeef820d89b8c3e78aae421bc7b1752e2dc68755cf42539a54b5fbd8a6c42','simulator','gpt-4o-mini','{"max_tokens": 60, "messages": [{"content": "Answer the question in one short sentence.", "role": "system"}, {"content": "What is 2 plus 2?", "role": "user"}], "model": "gpt-4o-mini", "temperature": 0}','{"id": "chatcmpl-d76aeef820d89b8c3e78aae4", "object": "chat.completion", "created": 1795601964, "model": "gpt-4o-mini", "choices": [{"index": 0, "finish_reason": "stop", "logprobs": null, "message": {"role": "assistant", "content": "Simulated reply 157ded88: alpha juliet whiskey oscar whiskey lima. You asked: What is 2 plus 2?", "refusal": null}}], "usage": {"prompt_tokens": 25, "completion_tokens": 28, "total_tokens": 53, "prompt_tokens_details": {"cached_tokens": 0}}, "system_fingerprint": "fp_flow_simulator"}','"what is 2 plus 2?"','sha256:9c2ded596788edcd54fbbc8c8a741a50e8ca669fcfabb32bc1f216672b1c2d61','done',NULL,NULL,0,NULL,NULL,NULL,NULL,NULL,'2026-11-25T10:19:40.846Z','2026-11-25T10:19:40.846Z',2);
INSERT INTO "calls" VALUES('sha256:5a5b13afcd699a258f79f5b7c00913cb4ace989341134360095c1686e4043619','simulator','gpt-4o-mini','{"max_tokens": 60, "messages": [{"content": "Answer the question in one short sentence.", "role": "system"}, {"content": "What is 3 plus 3?", "role": "user"}], "model": "gpt-4o-mini", "temperature": 0}','{"id": "chatcmpl-5a5b13afcd699a258f79f5b7", "object": "chat.completion", "created": 1795601964, "model": "gpt-4o-mini", "choices": [{"index": 0, "finish_reason": "stop", "logprobs": null, "message": {"role": "assistant", "content": "Simulated reply 8322311f: xray lima echo alpha delta mike. You asked: What is 3 plus 3?", "refusal": null}}], "usage": {"prompt_tokens": 25, "completion_tokens": 28, "total_tokens": 53, "prompt_tokens_details": {"cached_tokens": 0}}, "system_fingerprint": "fp_flow_simulator"}','"what is 3 plus 3?"','sha256:9c2ded596788edcd54fbbc8c8a741a50e8ca669fcfabb32bc1f216672b1c2d61','done',NULL,NULL,0,NULL,NULL,NULL,NULL,NULL,'2026-11-25T10:19:40.846Z','2026-11-25T10:19:40.846Z',2);
INSERT INTO "calls" VALUES('sha256:b5631bc5ea1c9abd0b2f8dc6ad16316036550077479c3b822cbf96dd87e90438','simulator','gpt-4o-mini','{"max_tokens": 60, "messages": [{"content": "Answer the question in one short sentence.", "role": "system"}, {"content": "What is the capital of France?", "role": "user"}], "model": "gpt-4o-mini", "temperature": 0}','{"id": "chatcmpl-b5631bc5ea1c9abd0b2f8dc6", "object": "chat.completion", "created": 1795601964, "model": "gpt-4o-mini", "choices": [{"index": 0, "finish_reason": "stop", "logprobs": null, "message": {"role": "assistant", "content": "Simulated reply 4bbb25e8: alpha victor xray charlie sierra oscar. You asked: What is the capital of France?", "refusal": null}}], "usage": {"prompt_tokens": 24, "completion_tokens": 31, "total_tokens": 55, "prompt_tokens_details": {"cached_tokens": 0}}, "system_fingerprint": "fp_flow_simulator"}','"what is the capital of france?"','sha256:9c2ded596788edcd54fbbc8c8a741a50e8ca669fcfabb32bc1f216672b1c2d61','done',NULL,NULL,0,NULL,NULL,NULL,NULL,NULL,'2026-11-25T10:19:40.848Z','2026-11-25T10:19:40.848Z',2);
INSERT INTO "calls" VALUES('sha256:bdfa7456d27d424e6c2af2c54fd587ae0d08a46e1828781eab50f9a70984de12','simulator','gpt-4o-mini','{"max_tokens": 60, "messages": [{"content": "Answer the question in one short sentence.", "role": "system"}, {"content": "Tell me a long story [sim:finish=length]?", "role": "user"}], "model": "gpt-4o-mini", "temperature": 0}','{"id": "chatcmpl-bdfa7456d27d424e6c2af2c5", "object": "chat.completion", "created": 1795601964, "model": "gpt-4o-mini", "choices": [{"index": 0, "finish_reason": "length", "logprobs": null, "message": {"role": "assistant", "content": "Simulated reply 7755b09f: xray lima kilo quebec lima tango. You asked: Tell me a long story [sim:finish=length]?", "refusal": null}}], "usage": {"prompt_tokens": 29, "completion_tokens": 34, "total_tokens": 63, "prompt_tokens_details": {"cached_tokens": 0}}, "system_fingerprint": "fp_flow_simulator"}',NULL,NULL,'failed','ResponseError','stored response is unusable (finish_reason=length)',0,NULL,NULL,NULL,NULL,NULL,'2026-11-25T10:19:40.848Z','2026-11-25T10:19:40.848Z',2);
INSERT INTO "calls" VALUES('sha256:bd0dc6dfd4d152fcb2181281fad9b08599edf6ac8a5aa8acffa8ab27c65b8bc6','simulator','gpt-4o-mini','{"max_tokens": 60, "messages": [{"content": "Answer the question in one short sentence.", "role": "system"}, {"content": "Name a colour", "role": "user"}], "model": "gpt-4o-mini", "temperature": 0}','{"id": "chatcmpl-bd0dc6dfd4d152fcb2181281", "object": "chat.completion", "created": 1795601964, "model": "gpt-4o-mini", "choices": [{"index": 0, "finish_reason": "stop", "logprobs": null, "message": {"role": "assistant", "content": "Simulated reply db96e469: juliet november bravo sierra oscar november. You asked: Name a colour", "refusal": null}}], "usage": {"prompt_tokens": 20, "completion_tokens": 24, "total_tokens": 44, "prompt_tokens_details": {"cached_tokens": 0}}, "system_fingerprint": "fp_flow_simulator"}',NULL,'sha256:9c2ded596788edcd54fbbc8c8a741a50e8ca669fcfabb32bc1f216672b1c2d61','failed','PostError','post step regex ''You asked: (.+[?])$'': no match in ''Simulated reply db96e469: juliet november bravo sierra oscar november. You asked''',0,NULL,NULL,NULL,NULL,NULL,'2026-11-25T10:19:40.848Z','2026-11-25T10:19:40.849Z',2);
INSERT INTO "calls" VALUES('sha256:6a4aec881a0dc45476d8636517dffcf80e1a53676c2b2fe5e85b755d9b536e2b','simulator','gpt-4o-mini','{"max_tokens": 60, "messages": [{"content": "Answer the question in one short sentence.", "role": "system"}, {"content": "What is 10 plus 10?", "role": "user"}], "model": "gpt-4o-mini", "temperature": 0}','{"id": "chatcmpl-6a4aec881a0dc45476d86365", "object": "chat.completion", "created": 1795601964, "model": "gpt-4o-mini", "choices": [{"index": 0, "finish_reason": "stop", "logprobs": null, "message": {"role": "assistant", "content": "Simulated reply 07bfd1d2: charlie sierra xray india november hotel. You asked: What is 10 plus 10?", "refusal": null}}], "usage": {"prompt_tokens": 25, "completion_tokens": 31, "total_tokens": 56, "prompt_tokens_details": {"cached_tokens": 0}}, "system_fingerprint": "fp_flow_simulator"}','"what is 10 plus 10?"','sha256:9c2ded596788edcd54fbbc8c8a741a50e8ca669fcfabb32bc1f216672b1c2d61','done',NULL,NULL,0,NULL,NULL,NULL,NULL,NULL,'2026-11-25T10:19:40.871Z','2026-11-25T10:19:40.871Z',2);
INSERT INTO "calls" VALUES('sha256:fe6d36e18ceb6bc38cd3be3f831fd8ae4666ae6a03bd1637c3b624e71f4597ac','simulator','gpt-4o-mini','{"max_tokens":60,"messages":[{"content":"Answer the question in one short sentence.","role":"system"},{"content":"Is this refused [sim:status=400]?","role":"user"}],"model":"gpt-4o-mini","temperature":0}',NULL,NULL,NULL,'failed','BadRequestError','400: Simulated error 400.',1,NULL,NULL,NULL,NULL,424.0,'2026-11-25T10:19:40.849Z','2026-11-25T10:19:41.273Z',2);
INSERT INTO "calls" VALUES('sha256:7c7233b76ef185c58633b78cb751b63480b3970eb691411cd6c4bc18e8cbaf24','simulator','gpt-4o-mini','{"max_tokens":60,"messages":[{"content":"Answer the question in one short sentence.","role":"system"},{"content":"What is 11 plus 11?","role":"user"}],"model":"gpt-4o-mini","temperature":0}','{"id": "chatcmpl-7c7233b76ef185c58633b78c", "object": "chat.completion", "created": 1795601981, "model": "gpt-4o-mini", "choices": [{"index": 0, "finish_reason": "stop", "logprobs": null, "message": {"role": "assistant", "content": "Simulated reply 141bf0a1: bravo mike kilo quebec xray xray. You asked: What is 11 plus 11?", "refusal": null}}], "usage": {"prompt_tokens": 25, "completion_tokens": 31, "total_tokens": 56, "prompt_tokens_details": {"cached_tokens": 0}}, "system_fingerprint": "fp_flow_simulator"}','"what is 11 plus 11?"','sha256:9c2ded596788edcd54fbbc8c8a741a50e8ca669fcfabb32bc1f216672b1c2d61','done',NULL,NULL,1,25,31,0,2.2349999999999997772e-05,404.3,'2026-11-25T10:19:40.872Z','2026-11-25T10:19:41.276Z',2);
INSERT INTO "calls" VALUES('sha256:d72347c395ce01d50dffed80172dd92eaddf70755288b4914f87389365d0c547','simulator','gpt-4o-mini','{"max_tokens":60,"messages":[{"content":"Answer the question in one short sentence.","role":"system"},{"content":"Who wrote Hamlet?","role":"user"}],"model":"gpt-4o-mini","temperature":0}','{"id": "chatcmpl-d72347c395ce01d50dffed80", "object": "chat.completion", "created": 1795601981, "model": "gpt-4o-mini", "choices": [{"index": 0, "finish_reason": "stop", "logprobs": null, "message": {"role": "assistant", "content": "Simulated reply dcc67fbf: hotel papa whiskey xray xray uniform. You asked: Who wrote Hamlet?", "refusal": null}}], "usage": {"prompt_tokens": 21, "completion_tokens": 25, "total_tokens": 46, "prompt_tokens_details": {"cached_tokens": 0}}, "system_fingerprint": "fp_flow_simulator"}','"who wrote hamlet?"','sha256:9c2ded596788edcd54fbbc8c8a741a50e8ca669fcfabb32bc1f216672b1c2d61','done',NULL,NULL,1,21,25,0,1.81499999999999973255e-05,404.8,'2026-11-25T10:19:40.872Z','2026-11-25T10:19:41.277Z',2);
CREATE TABLE items (
            stage TEXT NOT NULL,
            item_id TEXT NOT NULL,
            row INTEGER NOT NULL,
            input TEXT,
            request_key TEXT,
            origin TEXT NOT NULL,
            error_class TEXT,
            error TEXT,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (stage, item_id)
        ) WITHOUT ROWID;
INSERT INTO "items" VALUES('call','9',9,NULL,NULL,'simulator','RowError','rows.jsonl row 9: invalid JSON at column 27: Unterminated string starting at','2026-11-25T10:19:24.500Z');
INSERT INTO "items" VALUES('call','q01',1,'{"id": "q01", "question": "What is 1 plus 1?"}','sha256:6705d6c9a27021ae8859cca90f7e25bfef326bb1a7d259b61c5b1372d9081c1f','simulator',NULL,NULL,'2026-11-25T10:19:24.500Z');
INSERT INTO "items" VALUES('call','q02',2,'{"id": "q02", "question": "What is 2 plus 2?"}','sha256:d76aeef820d89b8c3e78aae421bc7b1752e2dc68755cf42539a54b5fbd8a6c42','simulator',NULL,NULL,'2026-11-25T10:19:24.500Z');
INSERT INTO "items" VALUES('call','q03',3,'{"id": "q03", "question": "What is 3 plus 3?"}','sha256:5a5b13afcd699a258f79f5b7c00913cb4ace989341134360095c1686e4043619','simulator',NULL,NULL,'2026-11-25T10:19:24.500Z');
INSERT INTO "items" VALUES('call','q04',4,'{"id": "q04", "question": "What is the capital of France?"}','sha256:b5631bc5ea1c9abd0b2f8dc6ad16316036550077479c3b822cbf96dd87e90438','simulator',NULL,NULL,'2026-11-25T10:19:24.500Z');
INSERT INTO "items" VALUES('call','q05',5,'{"id": "q05", "question": "What is the capital of France?"}','sha256:b5631bc5ea1c9abd0b2f8dc6ad16316036550077479c3b822cbf96dd87e90438','simulator',NULL,NULL,'2026-11-25T10:19:24.500Z');
INSERT INTO "items" VALUES('call','q06',6,'{"id": "q06", "question": "Tell me a long story [sim:finish=length]?"}','sha256:bdfa7456d27d424e6c2af2c54fd587ae0d08a46e1828781eab50f9a70984de12','simulator',NULL,NULL,'2026-11-25T10:19:24.500Z');
INSERT INTO "items" VALUES('call','q07',7,'{"id": "q07", "question": "Name a colour"}','sha256:bd0dc6dfd4d152fcb2181281fad9b08599edf6ac8a5aa8acffa8ab27c65b8bc6','simulator',NULL,NULL,'2026-11-25T10:19:24.500Z');
INSERT INTO "items" VALUES('call','q08',8,'{"id": "q08", "question": "Is this refused [sim:status=400]?"}','sha256:fe6d36e18ceb6bc38cd3be3f831fd8ae4666ae6a03bd1637c3b624e71f4597ac','simulator',NULL,NULL,'2026-11-25T10:19:24.500Z');
INSERT INTO "items" VALUES('call','q10',10,'{"id": "q10", "question": "What is 10 plus 10?"}','sha256:6a4aec881a0dc45476d8636517dffcf80e1a53676c2b2fe5e85b755d9b536e2b','simulator',NULL,NULL,'2026-11-25T10:19:24.500Z');
INSERT INTO "items" VALUES('call','q11',11,'{"id": "q11", "question": "What is 11 plus 11?"}','sha256:7c7233b76ef185c58633b78cb751b63480b3970eb691411cd6c4bc18e8cbaf24','simulator',NULL,NULL,'2026-11-25T10:19:40.844Z');
INSERT INTO "items" VALUES('call','q12',12,'{"id": "q12", "question": "Who wrote Hamlet?"}','sha256:d72347c395ce01d50dffed80172dd92eaddf70755288b4914f87389365d0c547','simulator',NULL,NULL,'2026-11-25T10:19:40.844Z');
CREATE TABLE migrations (name TEXT PRIMARY KEY, applied_at TEXT);
INSERT INTO "migrations" VALUES('m001_create_runs_items_calls','2026-11-25 10:19:24');
CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            pipeline TEXT NOT NULL,
            origin TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            pid INTEGER NOT NULL,
            started_at TEXT NOT NULL,
            finished_at TEXT,
            state TEXT NOT NULL,
            items_total INTEGER,
            items_done INTEGER NOT NULL DEFAULT 0,
            items_failed INTEGER NOT NULL DEFAULT 0,
            items_skipped INTEGER NOT NULL DEFAULT 0,
            calls_made INTEGER NOT NULL DEFAULT 0,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            cost_usd REAL NOT NULL DEFAULT 0,
            commit_groups INTEGER NOT NULL DEFAULT 0,
            commit_wait_mean_ms REAL,
            commit_wait_max_ms REAL,
            message TEXT
        );
INSERT INTO "runs" VALUES(1,'pipeline.yaml','simulator','http://127.0.0.1:42215/v1/',6569,'2026-11-25T10:19:24.494Z','2026-11-25T10:19:24.891Z','finished',10,6,4,0,9,197,236,1.71149999999999985955e-04,6,2.51,4.76,NULL);
INSERT INTO "runs" VALUES(2,'pipeline.yaml','simulator','http://127.0.0.1:43517/v1/',6832,'2026-11-25T10:19:40.837Z','2026-11-25T10:19:41.278Z','finished',12,8,4,0,3,46,56,4.04999999999999950968e-05,10,0.83,4.6,NULL);
CREATE INDEX items_by_row ON items (stage, row, item_id, request_key, origin, error_class, error);
CREATE INDEX items_by_request ON items (request_key, origin);
CREATE INDEX items_with_errors ON items (stage, row) WHERE error_class IS NOT NULL;
CREATE INDEX calls_by_status ON calls (status, error_class);
CREATE INDEX calls_summary ON calls (request_key, origin, status, error_class, prompt_tokens, completion_tokens, cost_usd, attempts);
CREATE INDEX attempts_by_call ON attempts (request_key, origin);
CREATE VIEW results AS
        SELECT
            items.stage,
            items.item_id,
            items.row,
            CASE
                WHEN items.error_class IS NOT NULL THEN 'failed'
                WHEN calls.status IS NULL THEN 'pending'
                ELSE calls.status
            END AS status,
            calls.output,
            COALESCE(items.error_class, calls.error_class) AS error_class,
            COALESCE(items.error, calls.error) AS error,
            calls.prompt_tokens,
            calls.completion_tokens,
            calls.cost_usd,
            calls.model,
            calls.attempts,
            calls.latency_ms,
            calls.finished_at,
            items.origin
        FROM items
        LEFT JOIN calls
            ON calls.request_key = items.request_key AND calls.origin = items.origin;
COMMIT;
