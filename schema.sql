-- The whole current schema of jobsite. PRAGMA user_version (last line) is its version;
-- db.py refuses a newer database and migrates an older one.
-- Times are Unix seconds (REAL, UTC).

CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    username TEXT NOT NULL UNIQUE COLLATE NOCASE,
    full_name TEXT NOT NULL DEFAULT '',
    email TEXT,
    password_hash TEXT,                      -- scrypt; NULL when the user signs in with GitHub only
    github_id INTEGER UNIQUE,
    is_admin INTEGER NOT NULL DEFAULT 0,
    is_active INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL
);

CREATE TABLE api_tokens (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,         -- sha256 of the token; the token itself is shown once
    created_at REAL NOT NULL,
    last_used_at REAL
);

CREATE TABLE projects (
    id INTEGER PRIMARY KEY,
    slug TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL UNIQUE COLLATE NOCASE,
    created_by INTEGER REFERENCES users(id),
    created_at REAL NOT NULL
);

CREATE TABLE project_members (
    project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('developer', 'collaborator', 'output_viewer')),
    PRIMARY KEY (project_id, user_id, role)
);

CREATE TABLE workspaces (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    project_id INTEGER NOT NULL REFERENCES projects(id),
    repo TEXT NOT NULL,
    branch TEXT NOT NULL,
    database TEXT NOT NULL,
    purpose TEXT NOT NULL DEFAULT '',
    notify_default INTEGER NOT NULL DEFAULT 0,
    archived INTEGER NOT NULL DEFAULT 0,
    created_by INTEGER REFERENCES users(id),
    created_at REAL NOT NULL
);

CREATE TABLE job_requests (
    id INTEGER PRIMARY KEY,
    workspace_id INTEGER NOT NULL REFERENCES workspaces(id),
    created_by INTEGER NOT NULL REFERENCES users(id),
    branch TEXT NOT NULL,
    sha TEXT NOT NULL,
    requested_actions TEXT NOT NULL,         -- JSON list
    force_run_dependencies INTEGER NOT NULL DEFAULT 0,
    notify INTEGER NOT NULL DEFAULT 0,
    priority INTEGER NOT NULL DEFAULT 0,     -- higher runs first among one user's peers
    status TEXT NOT NULL DEFAULT 'created',  -- 'created' or 'nothing_to_do'
    status_message TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
CREATE INDEX job_requests_workspace ON job_requests (workspace_id, id);
-- load: "your recent job requests" on the home page
CREATE INDEX job_requests_creator ON job_requests (created_by, id);

CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    job_request_id INTEGER NOT NULL REFERENCES job_requests(id),
    workspace_id INTEGER NOT NULL REFERENCES workspaces(id),
    user_id INTEGER NOT NULL REFERENCES users(id),
    action TEXT NOT NULL,
    sha TEXT NOT NULL,
    run_command TEXT NOT NULL,               -- "image:tag args..." as in project.yaml
    image TEXT NOT NULL,                     -- docker image reference from the image table
    args TEXT NOT NULL,                      -- JSON list, config appended
    outputs TEXT NOT NULL,                   -- JSON {level: {name: pattern}}
    needs TEXT NOT NULL DEFAULT '[]',        -- JSON list of direct dependency actions
    wait_for TEXT NOT NULL DEFAULT '[]',     -- JSON list of job ids that must succeed first
    requires_db INTEGER NOT NULL DEFAULT 0,
    timeout REAL,                            -- seconds; NULL means the site's job_timeout
    state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'succeeded', 'failed')),
    status_code TEXT NOT NULL,
    status_message TEXT NOT NULL DEFAULT '',
    exit_code INTEGER,
    image_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,     -- times the job was started (restart recovery)
    cancelled INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    updated_at REAL NOT NULL
);
CREATE INDEX jobs_request ON jobs (job_request_id);
CREATE INDEX jobs_workspace_action ON jobs (workspace_id, action, created_at);
CREATE INDEX jobs_active ON jobs (state) WHERE state IN ('pending', 'running');
CREATE INDEX jobs_completed ON jobs (completed_at);  -- /metrics reads jobs finished since its last scrape

-- every status a job passed through, for the timeline on the job page
CREATE TABLE job_events (
    id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs(id),
    status_code TEXT NOT NULL,
    status_message TEXT NOT NULL DEFAULT '',
    at REAL NOT NULL
);
CREATE INDEX job_events_job ON job_events (job_id, id);

-- slot-seconds each user used, decayed with a one-hour half-life at updated_at
CREATE TABLE user_usage (
    user_id INTEGER PRIMARY KEY REFERENCES users(id),
    usage REAL NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
);

-- emails waiting to be sent, retried with backoff
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY,
    job_id TEXT REFERENCES jobs(id),         -- the job an email is about: one email per job
    to_addr TEXT NOT NULL,
    subject TEXT NOT NULL,
    body TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    sent_at REAL,
    created_at REAL NOT NULL
);
CREATE UNIQUE INDEX outbox_job ON outbox (job_id) WHERE job_id IS NOT NULL;
CREATE INDEX outbox_unsent ON outbox (next_attempt_at) WHERE sent_at IS NULL;

-- small site-wide switches, such as the paused queue
CREATE TABLE site_state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

PRAGMA user_version = 2;
