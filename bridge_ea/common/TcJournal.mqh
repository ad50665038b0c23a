//+------------------------------------------------------------------+
//| TcJournal.mqh - the command idempotency memory, on disk          |
//|                                                                  |
//| Protocol rule: every cmd gets exactly one result, and a repeated |
//| corr is answered with the first result without trading again -  |
//| also after the terminal or the EA restarted. The journal is an   |
//| append-only text file in the terminal's sandbox:                 |
//|   <data folder>\MQL5\Files\Tradecopy\journal-<account>.txt       |
//|   (MQL4\Files\... on MT4)                                        |
//| one record per line, tab separated:                              |
//|   B <corr> <op> <ticket> <volume>   written *before* the trade   |
//|   R <corr> <result tail>            written after it             |
//|   A <ticket> <comment>              MT4: a remainder ticket and  |
//|                                     the copy comment it inherits |
//| corr and comment are stored JSON-escaped (no raw tab/newline).   |
//| A B without its R means the program died mid-trade: the command  |
//| is "in doubt" and the terminal adapter decides from the account  |
//| state whether it happened (CTcTerminal::Recover).                |
//|                                                                  |
//| Both records are flushed before the program goes on. Only the    |
//| newest TC_JOURNAL_KEEP records are loaded; a file twice that long|
//| is rewritten with them on start.                                 |
//+------------------------------------------------------------------+
#ifndef TC_JOURNAL_MQH
#define TC_JOURNAL_MQH

#include <Tradecopy\TcProtocol.mqh>

#define TC_JOURNAL_KEEP   20000
#define TC_J_NONE         0
#define TC_J_BEGUN        1
#define TC_J_RESULT       2

class CTcJournal
  {
private:
   string            m_file;
   int               m_handle;
   bool              m_keepOpen;
   //--- corr records
   CTcStrMap         m_idx;
   int               m_state[];
   string            m_corr[];
   string            m_op[];
   string            m_ticket[];
   double            m_volume[];
   string            m_tail[];
   int               m_n;
   //--- ticket aliases (MT4 partial closes)
   CTcStrMap         m_aliasIdx;
   string            m_aliasTicket[];
   string            m_aliasComment[];
   int               m_an;

   int               Slot(const string corr)
     {
      int i;
      if(m_idx.Get(corr, i))
         return i;
      if(m_n >= ArraySize(m_state))
        {
         int cap = (int)MathMax(256, m_n * 2);
         ArrayResize(m_state, cap);
         ArrayResize(m_corr, cap);
         ArrayResize(m_op, cap);
         ArrayResize(m_ticket, cap);
         ArrayResize(m_volume, cap);
         ArrayResize(m_tail, cap);
        }
      i = m_n++;
      m_state[i] = TC_J_NONE;
      m_corr[i] = corr;
      m_op[i] = "";
      m_ticket[i] = "";
      m_volume[i] = 0.0;
      m_tail[i] = "";
      m_idx.Set(corr, i);
      return i;
     }

   void              SetAlias(const string ticket, const string comment)
     {
      int i;
      if(!m_aliasIdx.Get(ticket, i))
        {
         if(m_an >= ArraySize(m_aliasTicket))
           {
            ArrayResize(m_aliasTicket, (int)MathMax(64, m_an * 2));
            ArrayResize(m_aliasComment, (int)MathMax(64, m_an * 2));
           }
         i = m_an++;
         m_aliasTicket[i] = ticket;
         m_aliasIdx.Set(ticket, i);
        }
      m_aliasComment[i] = comment;
     }

   void              ApplyLine(const string line)
     {
      string p[];
      int k = StringSplit(line, '\t', p);
      if(k < 2)
         return;
      if(p[0] == "B" && k >= 5)
        {
         int i = Slot(p[1]);
         if(m_state[i] != TC_J_RESULT)
           {
            m_state[i] = TC_J_BEGUN;
            m_op[i] = p[2];
            m_ticket[i] = p[3];
            m_volume[i] = StringToDouble(p[4]);
           }
        }
      else
         if(p[0] == "R" && k >= 3)
           {
            int i = Slot(p[1]);
            m_state[i] = TC_J_RESULT;
            m_tail[i] = p[2];
           }
         else
            if(p[0] == "A" && k >= 3)
               SetAlias(p[1], p[2]);
     }

   void              Append(const string line)
     {
      if(m_keepOpen)
        {
         if(m_handle == INVALID_HANDLE)
            return;
         FileWriteString(m_handle, line + "\r\n");
         FileFlush(m_handle);
         return;
        }
      //--- shared file (MT4 aliases: EA and loop script): open, append, close each time
      int h = FileOpen(m_file, FILE_READ | FILE_WRITE | FILE_TXT | FILE_ANSI | FILE_SHARE_READ | FILE_SHARE_WRITE, '\t', CP_UTF8);
      if(h == INVALID_HANDLE)
         return;
      FileSeek(h, 0, SEEK_END);
      FileWriteString(h, line + "\r\n");
      FileClose(h);
     }

public:
                     CTcJournal() : m_handle(INVALID_HANDLE), m_keepOpen(true), m_n(0), m_an(0) {}
                    ~CTcJournal() { Close(); }

   //--- name: "journal" (commands, CTcBridge: only the socket owner writes, the file stays open)
   //--- or "aliases" (MT4 ticket aliases, written by whichever program scans: keep_open false)
   bool              Open(const string account, const string name = "journal", const bool keep_open = true)
     {
      Close();
      m_keepOpen = keep_open;
      m_file = "Tradecopy\\" + name + "-" + account + ".txt";
      FolderCreate("Tradecopy");   // fails harmlessly when it exists
      //--- read what is there
      string lines[];
      int total = 0;
      int h = FileOpen(m_file, FILE_READ | FILE_TXT | FILE_ANSI | FILE_SHARE_READ | FILE_SHARE_WRITE, '\t', CP_UTF8);
      if(h != INVALID_HANDLE)
        {
         while(!FileIsEnding(h))
           {
            string line = FileReadString(h);
            if(StringLen(line) == 0)
               continue;
            if(total >= ArraySize(lines))
               ArrayResize(lines, (int)MathMax(1024, total * 2));
            lines[total++] = line;
           }
         FileClose(h);
        }
      int first = (int)MathMax(0, total - TC_JOURNAL_KEEP);
      //--- alias records are few and must survive: keep all of them
      for(int a = 0; a < first; a++)
         if(StringSubstr(lines[a], 0, 2) == "A\t")
            ApplyLine(lines[a]);
      for(int i = first; i < total; i++)
         ApplyLine(lines[i]);
      //--- compact a long file: rewrite it with what was loaded
      if(total > 2 * TC_JOURNAL_KEEP)
        {
         string tmp = m_file + ".tmp";
         int w = FileOpen(tmp, FILE_WRITE | FILE_TXT | FILE_ANSI, '\t', CP_UTF8);
         if(w != INVALID_HANDLE)
           {
            for(int a2 = 0; a2 < m_an; a2++)
               FileWriteString(w, "A\t" + m_aliasTicket[a2] + "\t" + m_aliasComment[a2] + "\r\n");
            for(int j = first; j < total; j++)
               if(StringSubstr(lines[j], 0, 2) != "A\t")
                  FileWriteString(w, lines[j] + "\r\n");
            FileClose(w);
            if(FileDelete(m_file))
               FileMove(tmp, 0, m_file, FILE_REWRITE);
           }
        }
      ArrayResize(lines, 0);
      if(!m_keepOpen)
        {
         PrintFormat("tradecopy: %s: %d ticket aliases", m_file, m_an);
         return true;
        }
      //--- open for appending
      m_handle = FileOpen(m_file, FILE_READ | FILE_WRITE | FILE_TXT | FILE_ANSI | FILE_SHARE_READ, '\t', CP_UTF8);
      if(m_handle == INVALID_HANDLE)
        {
         PrintFormat("tradecopy: cannot open the command journal %s (error %d): duplicate commands are "
                     "only recognised until the program stops", m_file, GetLastError());
         return false;
        }
      FileSeek(m_handle, 0, SEEK_END);
      PrintFormat("tradecopy: command journal %s: %d commands, %d ticket aliases", m_file, m_n, m_an);
      return true;
     }

   void              Close()
     {
      if(m_handle != INVALID_HANDLE)
        {
         FileClose(m_handle);
         m_handle = INVALID_HANDLE;
        }
     }

   //--- corr must already be JSON-escaped (TcJsonEscape): it is the key as stored
   int               Lookup(const string corr, string &tail, string &op, string &ticket, double &volume)
     {
      int i;
      if(!m_idx.Get(corr, i))
         return TC_J_NONE;
      tail = m_tail[i];
      op = m_op[i];
      ticket = m_ticket[i];
      volume = m_volume[i];
      return m_state[i];
     }

   void              Begin(const string corr, const string op, const string ticket, const double volume)
     {
      int i = Slot(corr);
      m_state[i] = TC_J_BEGUN;
      m_op[i] = op;
      m_ticket[i] = ticket;
      m_volume[i] = volume;
      Append("B\t" + corr + "\t" + TcJsonEscape(op) + "\t" + TcJsonEscape(ticket) + "\t" + TcNum8(volume));
     }

   void              Result(const string corr, const string tail)
     {
      int i = Slot(corr);
      m_state[i] = TC_J_RESULT;
      m_tail[i] = tail;
      Append("R\t" + corr + "\t" + tail);
     }

   //--- MT4: "ticket carries the copy comment comment" (the remainder of a partial close)
   void              Alias(const string ticket, const string comment)
     {
      string c = TcJsonEscape(comment);
      int i;
      if(m_aliasIdx.Get(ticket, i) && m_aliasComment[i] == c)
         return;
      SetAlias(ticket, c);
      Append("A\t" + ticket + "\t" + c);
     }
   //--- the copy comment a ticket inherited, "" when none (returned unescaped)
   string            AliasOf(const string ticket)
     {
      int i;
      if(!m_aliasIdx.Get(ticket, i))
         return "";
      CTcJsonObject o;
      if(o.Parse("{\"c\":\"" + m_aliasComment[i] + "\"}"))
         return o.Str("c");
      return m_aliasComment[i];
     }
  };

#endif // TC_JOURNAL_MQH
//+------------------------------------------------------------------+
