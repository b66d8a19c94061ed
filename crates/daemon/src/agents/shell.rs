//! The shell adapter: the plan run with `sh -c` (the built-in `shell`
//! runtime), or a `NAME=COMMAND` template run with `sh -c` with the plan
//! appended as a last quoted argument and in `$TASKMESH_PLAN`. Follow-ups
//! are written to stdin as lines; stdout lines that are Claude Code
//! stream-json are typed, the rest are stdout.

use std::path::Path;

use tokio::process::Command;

use super::{Agent, AgentEnd, Reading, Turn, user_message};
use crate::output::StreamParser;
use crate::pb::{ApprovalDecision, TaskMessageInput};

pub(crate) struct Shell {
    template: Option<String>,
    parser: StreamParser,
}

impl Shell {
    pub(crate) fn new(template: Option<String>) -> Self {
        Self {
            template,
            parser: StreamParser::default(),
        }
    }
}

impl Agent for Shell {
    fn command(&self, turn: &Turn, _dir: &Path) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c");
        match &self.template {
            Some(template) => cmd.arg(format!("{template} {}", shell_quote(&turn.prompt))),
            None => cmd.arg(&turn.prompt),
        };
        if let Some(id) = &turn.resume_session_id {
            cmd.env("TASKMESH_AGENT_SESSION_ID", id);
        }
        cmd
    }

    fn opening(&mut self, _turn: &Turn) -> (Vec<String>, Vec<TaskMessageInput>) {
        (Vec::new(), Vec::new())
    }

    fn follow_up(&mut self, text: &str) -> Result<(String, TaskMessageInput), String> {
        Ok((text.to_owned(), user_message(text)))
    }

    fn read_line(&mut self, line: &str) -> Reading {
        Reading {
            messages: self.parser.parse(line),
            ..Reading::default()
        }
    }

    fn decide(&mut self, _decision: &ApprovalDecision) -> Result<String, String> {
        Err("a shell task asks for no permissions".into())
    }

    fn interrupt(&mut self) -> Option<String> {
        None
    }

    fn end(&mut self) -> AgentEnd {
        AgentEnd {
            summary: self.parser.last_result.take(),
            error: None,
            session_id: self.parser.session_id.take(),
        }
    }
}

/// `s` as one single-quoted shell word.
pub(crate) fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
